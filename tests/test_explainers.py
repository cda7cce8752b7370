"""Explainers: call shape, shared work for several targets, and the method's definitions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from sp_lightning import (
    DoublePullback,
    Explainer,
    Gradient,
    GradientAscent,
    PullbackAscent,
    SmoothGrad,
    SmoothPullback,
    SoftPullback,
    equivalent_alpha,
)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 6),
    ).eval()


@pytest.fixture
def model() -> nn.Module:
    return make_model()


@pytest.fixture
def x() -> Tensor:
    return torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


EXPLAINERS: dict[str, Callable[[nn.Module], Explainer]] = {
    "gradient": Gradient,
    "soft": SoftPullback,
    "double": DoublePullback,
    "ascent": lambda m: PullbackAscent(m, alpha=2.0, steps=3),
    "gradient_ascent": lambda m: GradientAscent(m, alpha=2.0, steps=2),
    "smooth": lambda m: SmoothPullback(m, n=4, sigma=0.1, noise_batch=3),
    "smoothgrad": lambda m: SmoothGrad(m, n=2),
}


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_target_forms_and_multi_target_equals_separate_calls(name: str, model: nn.Module, x: Tensor) -> None:
    explainer = EXPLAINERS[name](model)
    targets = torch.tensor([[0, 5, 2], [1, 1, 3], [4, 0, 2]])
    together = explainer.attribute(x, targets)
    assert together.shape == (3, 3, 3, 8, 8)
    for t in range(3):
        torch.testing.assert_close(together[:, t], explainer.attribute(x, targets[:, t]), rtol=1e-5, atol=1e-6)
    same = explainer.attribute(x, 2)
    assert same.shape == x.shape
    torch.testing.assert_close(same, explainer.attribute(x, torch.full((3,), 2)))
    torch.testing.assert_close(same, explainer.attribute(x, torch.tensor(2)))


@pytest.mark.parametrize("name,forwards", [("soft", 1), ("gradient", 1), ("double", 2), ("ascent", 3)])
def test_several_targets_share_forwards(name: str, forwards: int, model: nn.Module, x: Tensor) -> None:
    calls = count_forwards(model)
    EXPLAINERS[name](model).attribute(x, torch.tensor([[0, 1, 2, 3]] * 3))
    assert calls[0] == forwards


class MixedGates(nn.Module):
    """ReLU, both max-pool paths (separable; ceil_mode), fused SDPA and hand-written attention."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.qkv, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 24), nn.Linear(8, 6)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(F.max_pool2d(torch.relu(self.conv(x)), 2), 3, 2, ceil_mode=True)
        q, k, v = self.qkv(h.flatten(2).transpose(1, 2)).chunk(3, dim=-1)
        fused = F.scaled_dot_product_attention(q, k, v)
        by_hand = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v
        return self.head((fused + by_hand).mean(1))


class KernelCounter(TorchDispatchMode):
    """Counts the kernels soft rules derive their weights with (erf/erfc: gates; exp: max-pool; softmax, pow)."""

    COUNTED = ("erf", "erfc", "exp", "_softmax", "pow", "threshold")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += func.overloadpacket.__name__.rstrip("_") in self.COUNTED
        return func(*args, **(kwargs or {}))


def test_several_targets_derive_each_gate_once_and_equal_separate_calls(x: Tensor) -> None:
    model = MixedGates().eval()
    explainer = SoftPullback(model, {"attention": 0.5})
    targets = torch.tensor([[0, 5, 2], [1, 1, 3], [4, 0, 2]])
    counts = []
    for t in (targets[:, :1], targets[:, :2], targets):
        with KernelCounter() as counter:
            together = explainer.attribute(x, t)
        counts.append(counter.count)
    # Gates, window weights and softened attention are derived once per graph: no more work per extra target.
    assert 0 < counts[2] == counts[1] <= counts[0]
    for t in range(3):  # one backward batched across the targets: the same sums in another order
        torch.testing.assert_close(together[:, t], explainer.attribute(x, targets[:, t]), rtol=1e-5, atol=1e-7)


def test_gradient_is_the_autograd_gradient_of_the_logit(model: nn.Module, x: Tensor) -> None:
    leaf = x.clone().requires_grad_(True)
    expected = torch.autograd.grad(model(leaf)[:, 4].sum(), leaf)[0]
    torch.testing.assert_close(Gradient(model).attribute(x, 4), expected)


def test_soft_pullback_differs_from_gradient_and_follows_temperature(model: nn.Module, x: Tensor) -> None:
    grad = Gradient(model).attribute(x, 1)
    assert not torch.allclose(SoftPullback(model).attribute(x, 1), grad)
    hardish = SoftPullback(model, {"relu": 1e-9, "maxpool": 1e-9, "gelu": None}).attribute(x, 1)
    torch.testing.assert_close(hardish, grad)


def test_double_pullback_is_pullback_at_shifted_point(model: nn.Module, x: Tensor) -> None:
    sp = SoftPullback(model).attribute(x, 3)
    expected = SoftPullback(model).attribute(x + 2.0 * sp, 3)
    torch.testing.assert_close(DoublePullback(model, alpha=2.0).attribute(x, 3), expected)


def normalised(g: Tensor) -> Tensor:
    return g / g.flatten(1).norm(dim=1).clamp_min(1e-20).view(-1, 1, 1, 1)


def test_pullback_ascent_single_step(model: nn.Module, x: Tensor) -> None:
    sp = SoftPullback(model).attribute(x, 2)
    result = PullbackAscent(model, alpha=5.0, steps=1).ascend(x, 2)
    torch.testing.assert_close(result.attribution, 5.0 * normalised(sp))
    torch.testing.assert_close(result.counterfactual, x + 5.0 * normalised(sp))
    torch.testing.assert_close(PullbackAscent(model, alpha=5.0, steps=1).attribute(x, 2), result.attribution)
    grad = Gradient(model).attribute(x, 2)
    torch.testing.assert_close(GradientAscent(model, alpha=5.0, steps=1).attribute(x, 2), 5.0 * normalised(grad))


def test_pullback_ascent_iterates(model: nn.Module, x: Tensor) -> None:
    explainer = PullbackAscent(model, alpha=3.0, steps=2)
    first = x + 3.0 * normalised(SoftPullback(model).attribute(x, 0))
    second = first + 3.0 * normalised(SoftPullback(model).attribute(first, 0))
    torch.testing.assert_close(explainer.counterfactual(x, 0), second)


def test_pullback_ascent_reuses_a_given_first_pullback(model: nn.Module, x: Tensor) -> None:
    targets = torch.tensor([[0, 1], [2, 3]]).repeat(x.shape[0] // 2 + 1, 1)[: x.shape[0]]
    sp = SoftPullback(model).attribute(x, targets)
    explainer = PullbackAscent(model, alpha=3.0, steps=2)
    expected = explainer.ascend(x, targets)
    reused = explainer.ascend(x, targets, first=sp)
    torch.testing.assert_close(reused.counterfactual, expected.counterfactual, rtol=0, atol=0)
    # The given pullback really drives the first step: a different one moves the result.
    moved = explainer.ascend(x, targets, first=sp.flip(0))
    assert not torch.allclose(moved.counterfactual, expected.counterfactual)
    single = explainer.ascend(x, 1, first=SoftPullback(model).attribute(x, 1))
    torch.testing.assert_close(single.counterfactual, explainer.counterfactual(x, 1), rtol=0, atol=0)


def test_pullback_ascent_rejects_a_first_pullback_of_the_wrong_shape(model: nn.Module, x: Tensor) -> None:
    with pytest.raises(ValueError, match="first must be the pullback toward target"):
        PullbackAscent(model).ascend(x, 1, first=torch.zeros(x.shape[0], 1, *x.shape[1:]))


def test_unclipped_ascent_moves_at_most_alpha_times_steps(model: nn.Module, x: Tensor) -> None:
    delta = PullbackAscent(model, alpha=4.0, steps=3).attribute(x, 1)
    assert (delta.flatten(1).norm(dim=1) <= 12.0 + 1e-4).all()


def test_eps_ball_projection(model: nn.Module, x: Tensor) -> None:
    delta = PullbackAscent(model, alpha=4.0, steps=3, eps=2.5).attribute(x, 1)
    torch.testing.assert_close(delta.flatten(1).norm(dim=1), torch.full((3,), 2.5))
    inside = PullbackAscent(model, alpha=0.5, steps=2, eps=10.0).attribute(x, 1)
    torch.testing.assert_close(inside, PullbackAscent(model, alpha=0.5, steps=2).attribute(x, 1))


@pytest.mark.parametrize("clip", ["every", "last"])
def test_clipping_keeps_counterfactual_in_bounds(clip: str, model: nn.Module) -> None:
    x = torch.rand(3, 3, 8, 8) * 0.5
    low, high = [0.0, -0.1, 0.05], [0.6, 0.5, 0.55]
    explainer = PullbackAscent(model, alpha=20.0, steps=3, clip=clip, bounds=(low, high))
    cf = explainer.counterfactual(x, 1)
    lo, hi = torch.tensor(low).view(1, 3, 1, 1), torch.tensor(high).view(1, 3, 1, 1)
    assert (cf >= lo).all() and (cf <= hi).all()
    unclipped = PullbackAscent(model, alpha=20.0, steps=3).counterfactual(x, 1)
    assert ((unclipped < lo) | (unclipped > hi)).any()  # the clip really did something
    if clip == "last":
        torch.testing.assert_close(cf, torch.maximum(torch.minimum(unclipped, hi), lo))


def test_clip_modes_differ(model: nn.Module) -> None:
    x = torch.rand(3, 3, 8, 8)
    every = PullbackAscent(model, alpha=20.0, steps=3, clip="every", bounds=(0.0, 1.0)).counterfactual(x, 1)
    last = PullbackAscent(model, alpha=20.0, steps=3, clip="last", bounds=(0.0, 1.0)).counterfactual(x, 1)
    assert not torch.allclose(every, last)


def test_smooth_pullback_is_mean_over_noise_and_deterministic(model: nn.Module, x: Tensor) -> None:
    torch.testing.assert_close(SmoothPullback(model, n=1, sigma=0.0).attribute(x, 2),
                               SoftPullback(model).attribute(x, 2))
    a = SmoothPullback(model, n=5, sigma=0.2, noise_batch=2).attribute(x, 2)
    b = SmoothPullback(model, n=5, sigma=0.2, noise_batch=5).attribute(x, 2)
    torch.testing.assert_close(a, b)  # chunking does not change the draws
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((5, *x.shape), generator=gen)
    expected = torch.stack([SoftPullback(model).attribute(x + 0.2 * n, 2) for n in noise]).mean(0)
    torch.testing.assert_close(a, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(SmoothPullback(model, n=5, sigma=0.2, seed=1).attribute(x, 2), a)


def test_equivalent_alpha_keeps_per_element_step() -> None:
    assert equivalent_alpha((3, 224, 224)) == pytest.approx(20.0)
    small = equivalent_alpha((3, 32, 32), range_width=1.0)
    assert small / (3 * 32 * 32) ** 0.5 == pytest.approx(20.0 / (3 * 224 * 224) ** 0.5 / 2)


class TupleModel(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net, self.kind = make_model(), kind

    def forward(self, x: Tensor) -> object:
        logits = self.net(x)
        if self.kind == "tuple":
            return logits, x.mean()
        if self.kind == "dict":
            return {"logits": logits, "features": x}
        return {"scores": logits}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_structured_outputs(kind: str, x: Tensor) -> None:
    torch.testing.assert_close(SoftPullback(TupleModel(kind)).attribute(x, 1), SoftPullback(make_model()).attribute(x, 1))


def test_logits_fn_and_unreadable_output(x: Tensor) -> None:
    model = TupleModel("other")
    with pytest.raises(TypeError, match="logits_fn"):
        SoftPullback(model).attribute(x, 1)
    out = SoftPullback(model, logits_fn=lambda o: o["scores"]).attribute(x, 1)
    torch.testing.assert_close(out, SoftPullback(make_model()).attribute(x, 1))


def test_bad_targets_and_arguments(model: nn.Module, x: Tensor) -> None:
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        SoftPullback(model).attribute(x, 6)
    with pytest.raises(ValueError, match=r"\[0, 5\]"):
        Gradient(model).attribute(x, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match="B = 3"):
        SoftPullback(model).attribute(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        SoftPullback(model).attribute(x, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="bounds"):
        PullbackAscent(model, clip="every")
    with pytest.raises(ValueError, match="clip"):
        PullbackAscent(model, clip="sometimes", bounds=(0, 1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="eps"):
        PullbackAscent(model, eps=0.0)
    with pytest.raises(ValueError, match="per-channel|one value per channel"):
        PullbackAscent(model, clip="last", bounds=([0.0, 0.0], [1.0, 1.0])).attribute(x, 0)
    with pytest.raises(ValueError, match="n and noise_batch"):
        SmoothPullback(model, n=0)
    with pytest.raises(TypeError, match="nn.Module"):
        SoftPullback(lambda t: t)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        SoftPullback(nn.Identity()).attribute(x, 0)
