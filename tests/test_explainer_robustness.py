"""Explainers under stress: two threads on one model, and clear words for inputs they cannot explain."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import Tensor, nn

from _support import assert_same, snapshot

from sp_lightning import (
    Gradient,
    NonFiniteWarning,
    PullbackAscent,
    SoftPullback,
    coverage_report,
    soft_backward,
)
from sp_lightning.engine import SoftRules, read_logits, suspended


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6),
    )


@pytest.fixture
def x() -> Tensor:
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_two_threads_on_one_model_get_their_own_results_and_leave_it_untouched(x: Tensor) -> None:
    model = make_model().train()  # train mode: a forward outside eval would move the BatchNorm statistics
    before = snapshot(model)
    expected = {"gradient": Gradient(model).attribute(x, 2), "soft": SoftPullback(model).attribute(x, 2)}
    explainers = {"gradient": Gradient(model), "soft": SoftPullback(model)}
    start = threading.Barrier(2)
    results: dict[str, list[Tensor]] = {name: [] for name in explainers}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            start.wait()
            for _ in range(12):
                results[name].append(explainers[name].attribute(x, 2))
        except BaseException as error:  # reported below: a thread's exception would otherwise be lost
            errors.append(error)

    threads = [threading.Thread(target=run, args=(name,)) for name in explainers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert not torch.equal(expected["gradient"], expected["soft"])
    for name, values in results.items():
        assert len(values) == 12 and all(torch.equal(v, expected[name]) for v in values), name
    assert_same(before, snapshot(model))  # still in train mode, BatchNorm statistics unchanged


def test_suspension_is_per_thread(x: Tensor) -> None:
    """An explainer pausing a training handle in one thread leaves the handle on in the others."""
    model = make_model().eval()
    handle = soft_backward(model).enable()
    seen: list[bool] = []
    try:
        with suspended(model):
            worker = threading.Thread(target=lambda: seen.append(handle.suspended))
            worker.start()
            worker.join()
            assert handle.suspended
        assert not handle.suspended
    finally:
        handle.disable()
    assert seen == [False]


def test_three_dim_input_names_the_missing_batch_dim() -> None:
    with pytest.raises(ValueError, match=r"without its batch dimension.*unsqueeze\(0\)"):
        Gradient(make_model()).attribute(torch.randn(3, 8, 8), 0)


def test_empty_targets_are_an_error_naming_the_shape(x: Tensor) -> None:
    with pytest.raises(ValueError, match=r"\(3, 0\): no target class"):
        SoftPullback(make_model()).attribute(x, torch.zeros(3, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="no samples"):
        SoftPullback(make_model()).attribute(x[:0], 0)


class InPlaceInput(nn.Module):
    """Centres its input in place (as some preprocessing wrappers do), then runs a CNN."""

    def __init__(self) -> None:
        super().__init__()
        self.net = make_model()
        self.in_place = True

    def forward(self, x: Tensor) -> Tensor:
        x = x.sub_(0.5) if self.in_place else x - 0.5
        return self.net(x.mul_(2.0) if self.in_place else x * 2.0)


@pytest.mark.parametrize("explainer", [Gradient, SoftPullback, lambda m: PullbackAscent(m, alpha=1.0, steps=2)])
def test_a_model_that_edits_its_input_in_place_is_explained_like_its_out_of_place_twin(explainer, x: Tensor) -> None:
    model = InPlaceInput().eval()
    original = x.clone()
    edited = explainer(model).attribute(x, 1)
    model.in_place = False
    torch.testing.assert_close(edited, explainer(model).attribute(x, 1))
    assert torch.equal(x, original)  # the caller's tensor is untouched
    model.in_place = True
    assert coverage_report(model, x).softened["relu"] == 1


def test_nan_inputs_and_attributions_warn(x: Tensor) -> None:
    model = make_model().eval()
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    for run in (lambda: SoftPullback(model).attribute(bad, 1), lambda: PullbackAscent(model, steps=1).ascend(bad, 1)):
        with pytest.warns(NonFiniteWarning) as caught:
            run()
        messages = [str(w.message) for w in caught]
        assert any("inputs hold 1 NaN/Inf" in m for m in messages)
        assert any("attributions hold" in m for m in messages)

    class Root(nn.Module):
        def forward(self, t: Tensor) -> Tensor:
            return t.abs().sqrt().flatten(1)[:, :4]  # infinite slope at 0

    zeros = torch.zeros(2, 3, 2, 2)
    with pytest.warns(NonFiniteWarning, match="attributions hold"):
        Gradient(Root()).attribute(zeros, 0)


def test_soft_rules_with_options_is_one_error_everywhere(x: Tensor) -> None:
    model, rules = make_model().eval(), SoftRules.create({"relu": 0.5})
    for call in (
        lambda: SoftPullback(model, rules, maxpool_padding="zeros"),
        lambda: PullbackAscent(model, temperatures=rules, maxpool_padding="zeros"),
        lambda: coverage_report(model, x, rules, maxpool_padding="zeros"),
        lambda: soft_backward(model, rules, maxpool_padding="zeros"),
    ):
        with pytest.raises(TypeError, match=r"SoftRules object and the options \['maxpool_padding'\]"):
            call()
    assert SoftRules.coerce(rules) is rules
    assert SoftRules.coerce({"relu": 0.5}, maxpool_padding="zeros").maxpool_padding == "zeros"


def test_read_logits_is_the_plain_forward_checked(x: Tensor) -> None:
    model = make_model().eval()
    with torch.no_grad():
        assert torch.equal(read_logits(model, x), model(x))
        assert torch.equal(read_logits(nn.Sequential(model), x, lambda out: out * 1), model(x))
        with pytest.raises(ValueError, match=r"\(B, num_classes\)"):
            read_logits(model, x, lambda out: out[0])
