"""soft_backward scoping and restoration, and the explainers' promise to leave no trace."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from _support import assert_same, mode_stack_depth, snapshot

from sp_lightning import Gradient, PullbackAscent, SmoothPullback, SoftBackward, SoftPullback, soft_backward


class Net(nn.Module):
    """Small CNN with in-place ReLU, BatchNorm, Dropout and an inline F.relu (DenseNet-style)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.fail = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.act(self.bn(self.conv(x))))
        if self.fail:
            raise RuntimeError("boom")
        return self.fc(self.drop(F.relu(x)).flatten(1))


@pytest.fixture
def net() -> Net:
    torch.manual_seed(0)
    model = Net()
    model.train()
    model.drop.eval()  # mixed flags: restoration must be per submodule
    model.fc.weight.requires_grad_(False)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    return model


def test_forward_bit_identical_and_model_restored(net: Net) -> None:
    net.eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    before = snapshot(net)
    plain = net(x)
    with soft_backward(net):
        soft = net(x)
    assert torch.equal(plain, soft)
    assert_same(before, snapshot(net))
    assert mode_stack_depth() == 0


def test_restored_after_exception_mid_forward(net: Net) -> None:
    net.eval()
    before = snapshot(net)
    net.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        with soft_backward(net):
            net(torch.randn(2, 3, 8, 8, requires_grad=True))
    net.fail = False
    assert mode_stack_depth() == 0
    assert_same(before, snapshot(net))


def test_persistent_handle_survives_failing_forward(net: Net) -> None:
    """An exception inside the forward leaves no mode behind, even while the handle stays enabled."""
    handle = SoftBackward(net).enable()
    net.fail = True
    with pytest.raises(RuntimeError):
        net(torch.randn(2, 3, 8, 8, requires_grad=True))
    assert mode_stack_depth() == 0
    net.fail = False
    handle.disable()


def test_persistent_enable_disable_switches_backward(net: Net) -> None:
    net.eval()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)

    def input_grad() -> Tensor:
        return torch.autograd.grad(net(x)[:, 0].sum(), x)[0]

    plain = input_grad()
    handle = soft_backward(net).enable()
    assert handle.enabled
    soft = input_grad()
    handle.disable()
    assert not handle.enabled
    assert not torch.allclose(plain, soft)
    assert torch.equal(plain, input_grad())


def test_rules_apply_only_inside_the_model_forward() -> None:
    model = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    with soft_backward(model):
        outside = torch.autograd.grad(F.relu(model(x)).sum(), x)[0]
    assert torch.equal(outside, torch.autograd.grad(F.relu(model(x)).sum(), x)[0])


def test_soft_backward_rejects_non_modules() -> None:
    with pytest.raises(TypeError, match="nn.Module"):
        soft_backward(lambda t: t)  # type: ignore[arg-type]


EXPLAINERS = {
    "gradient": lambda m: Gradient(m),
    "soft": lambda m: SoftPullback(m),
    "ascent": lambda m: PullbackAscent(m, alpha=1.0, steps=2),
    "smooth": lambda m: SmoothPullback(m, n=3, sigma=0.1),
}


@pytest.mark.parametrize("name", sorted(EXPLAINERS))
def test_explainers_leave_no_trace(name: str, net: Net) -> None:
    """Train/eval flags of every submodule, .grad, requires_grad, BN stats, hooks and RNG unchanged."""
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(net)
    rng = torch.get_rng_state()
    out = EXPLAINERS[name](net).attribute(x, torch.tensor([1, 3]))
    assert out.shape == (2, 3, 8, 8) and torch.isfinite(out).all() and out.abs().sum() > 0
    assert torch.equal(rng, torch.get_rng_state())
    assert_same(before, snapshot(net))
    assert mode_stack_depth() == 0


def test_explainer_restores_state_after_error(net: Net) -> None:
    before = snapshot(net)
    net.fail = True
    with pytest.raises(RuntimeError, match="boom"):
        SoftPullback(net).attribute(torch.randn(2, 3, 8, 8), 0)
    net.fail = False
    assert_same(before, snapshot(net))
    assert mode_stack_depth() == 0


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_explainers_work_under_inference_mode_and_no_grad(context: type, net: Net) -> None:
    x = torch.randn(2, 3, 8, 8)
    expected = SoftPullback(net).attribute(x, 2)
    with context():
        inside = SoftPullback(net).attribute(x.clone(), 2)
    torch.testing.assert_close(inside.clone(), expected)
    assert not inside.requires_grad


def test_explainer_does_not_double_apply_an_enabled_handle(net: Net) -> None:
    """A training-time handle on the model is paused while an explainer runs."""
    x = torch.randn(2, 3, 8, 8)
    plain_grad = Gradient(net).attribute(x, 1)
    soft = SoftPullback(net, {"relu": 0.3}).attribute(x, 1)
    handle = soft_backward(net, {"relu": 2.0, "maxpool": 1.0}).enable()
    try:
        torch.testing.assert_close(Gradient(net).attribute(x, 1), plain_grad)
        torch.testing.assert_close(SoftPullback(net, {"relu": 0.3}).attribute(x, 1), soft)
    finally:
        handle.disable()


def test_explainers_on_a_deep_copy_are_independent(net: Net) -> None:
    """Handles are tied to the module they were enabled on."""
    handle = soft_backward(net).enable()
    clone = copy.deepcopy(net)
    handle.disable()
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(Gradient(clone).attribute(x, 0), Gradient(net).attribute(x, 0))
