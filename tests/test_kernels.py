"""Compiled soft-rule kernels: used on large activations, same results as the eager code, clean fallback."""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from sp_lightning import SoftPullback
from sp_lightning.engine.rules import kernels, pooling
from sp_lightning.engine.rules.kernels import CompiledKernel


class Block(nn.Module):
    """Every compiled kernel's use: ReLU after an eval BatchNorm (affine recipe), ReLU of BatchNorm +
    residual (sum recipe), GELU of a stored input, a 3x3/2 max-pool (separable routing) and a 2x2 one
    (windows tiling the input). Each activation has at least ``MIN_FUSED_NUMEL`` elements at batch 4."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool1 = nn.MaxPool2d(3, 2, 1)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.pool2 = nn.MaxPool2d(2)
        self.head = nn.Linear(16 * 16 * 16, 5)
        for bn in (self.bn1, self.bn2):  # non-trivial running statistics
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        h = self.pool1(torch.relu(self.bn1(self.conv1(x))))
        h = torch.relu(self.bn2(self.conv2(h)) + h)
        h = self.pool2(nn.functional.gelu(h * 1.5))
        return self.head(h.flatten(1))


@pytest.fixture(autouse=True)
def compile_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compile on first use (the default waits until eager work would have paid for compiling)."""
    monkeypatch.setenv("SP_LIGHTNING_COMPILE", "always")


@pytest.fixture
def inputs() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, 64, 64, generator=gen), torch.tensor([0, 1, 2, 3])


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Counts compiled-kernel calls by kernel name, and for the gate the recipe shape of x."""
    seen: Counter[str] = Counter()
    original = CompiledKernel.__call__

    def spy(self: CompiledKernel, *args: Any) -> Tensor | None:
        seen[self.fn.__name__] += 1
        if self.fn in (kernels._phi_of_terms, kernels._phi_cotangents):
            seen["terms " + "+".join("stored" if scale is None else "affine" for _, scale, _ in args[0])] += 1
        return original(self, *args)

    monkeypatch.setattr(CompiledKernel, "__call__", spy)
    return seen


def eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """From now on every input is below the size that uses a compiled kernel."""
    monkeypatch.setattr(kernels, "MIN_FUSED_NUMEL", 2**62)


def test_large_activations_use_the_compiled_kernels_and_match_the_eager_code(
    inputs: tuple[Tensor, Tensor], calls: Counter[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Block()
    compiled = SoftPullback(model).attribute(*inputs)
    assert calls["terms affine"] == 1  # ReLU after an eval BatchNorm
    assert calls["terms affine+stored"] == 1  # ReLU of BatchNorm + residual
    assert calls["terms stored"] == 1  # GELU
    # each max-pool (tiling windows too): the window totals and weights; then the spread cotangent times
    # the weights, compiled for the 2x2 pool (the 3x3/2 one on even sizes spreads faster eagerly)
    assert calls["_window_totals_body"] == 2
    assert calls["_spread_into_body"] == 1
    eager(monkeypatch)
    calls.clear()
    reference = SoftPullback(model).attribute(*inputs)
    assert not calls
    torch.testing.assert_close(compiled, reference, rtol=1e-4, atol=1e-5 * float(reference.abs().max()))


def test_the_kernels_gate_is_the_normal_cdf_within_its_stated_error() -> None:
    """The compiled gate's rational erf (float32 on CPU): Phi within 2.2e-7 everywhere, a mean error
    near float32's rounding, inside [0, 1], exactly 0 and 1 in the tails; float64 keeps torch.erf."""
    z = torch.linspace(-8.0, 8.0, 1_600_001)
    exact = (1 + torch.special.erf(z.double())) / 2
    gate = kernels.kernel_phi(z)
    error = (gate.double() - exact).abs()
    assert gate.dtype == torch.float32
    assert float(error.max()) <= 2.2e-7 and float(error.mean()) <= 3e-8
    assert float(gate.min()) == 0.0 and float(gate.max()) == 1.0
    tails = z.abs() >= 4.0
    assert torch.equal(gate[tails], (z[tails] > 0).float())
    wide = kernels.kernel_phi(z.double())
    torch.testing.assert_close(wide, exact, rtol=0, atol=1e-15)


def test_several_targets_match_separate_calls_on_the_compiled_path(
    inputs: tuple[Tensor, Tensor], calls: Counter[str]
) -> None:
    model, (x, _) = Block(), inputs
    targets = torch.tensor([[0, 3], [1, 4], [2, 0], [3, 1]])
    looped = SoftPullback(model)
    looped.batch_targets = False  # one backward per target: the compiled kernels serve each
    together = looped.attribute(x, targets)
    assert calls["_phi_of_terms"] == 3  # each gate derived once for both targets
    calls.clear()
    explainer = SoftPullback(model)
    explainer.batch_targets = True
    batched = explainer.attribute(x, targets)  # one backward under a vmap: eager kernels, none compiled
    assert not calls
    for t in range(2):
        alone = SoftPullback(model).attribute(x, targets[:, t])
        scale = float(alone.abs().max())
        torch.testing.assert_close(together[:, t], alone, rtol=1e-5, atol=1e-7 * scale)
        # the eager gate takes torch.erf, the compiled one its rational fit: about 1e-6 of the largest value
        torch.testing.assert_close(batched[:, t], alone, rtol=1e-5, atol=1e-6 * scale)


def test_no_compiled_kernel_while_a_higher_order_graph_is_recorded(
    inputs: tuple[Tensor, Tensor], calls: Counter[str]
) -> None:
    from sp_lightning import soft_backward

    model, (x, y) = Block(), inputs
    x = x.clone().requires_grad_(True)
    with soft_backward(model):
        logits = model(x)
    (grad,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), x, create_graph=True)
    assert grad.requires_grad
    assert not calls


#: What the Block's T=1 pullback tries to compile; when one fails, the eager code behind it tries the next.
KERNELS_TRIED = ("_phi_cotangents", "_phi_of_terms", "_window_totals_body", "_shifted_weights_body")


def test_a_failing_compiler_warns_once_and_falls_back_to_the_eager_code(
    inputs: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Block()

    def broken_compile(fn: Any, **options: Any) -> Any:
        def run(*args: Any) -> Tensor:
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    for module in (kernels, pooling):  # fresh kernels, not yet compiled
        for name, kernel in vars(module).copy().items():
            if isinstance(kernel, CompiledKernel):
                monkeypatch.setattr(module, name, CompiledKernel(kernel.fn))
    with pytest.warns(RuntimeWarning, match=r"failed \(RuntimeError: no C\+\+ compiler found\)") as record:
        fallen_back = SoftPullback(model).attribute(*inputs)
    failed = sorted(str(w.message).split("kernel ")[1].split()[0] for w in record)
    assert failed == sorted(KERNELS_TRIED)  # one warning per kernel tried
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = SoftPullback(model).attribute(*inputs)
    assert torch.equal(again, fallen_back)
    eager(monkeypatch)
    assert torch.equal(SoftPullback(model).attribute(*inputs), fallen_back)


def test_max_pool_falls_back_on_its_held_weights_when_only_the_second_kernel_fails(
    inputs: tuple[Tensor, Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = Block()
    reference = SoftPullback(model).attribute(*inputs)

    def failing(*args: Any) -> Tensor:
        raise RuntimeError("backend failure")

    kernel = CompiledKernel(pooling._spread_into_body)
    kernel.compiled = failing
    monkeypatch.setattr(pooling, "_SPREAD_INTO", kernel)
    with pytest.warns(RuntimeWarning, match=r"_spread_into_body failed \(RuntimeError: backend failure\)"):
        fallen_back = SoftPullback(model).attribute(*inputs)
    assert kernel.broken
    torch.testing.assert_close(fallen_back, reference, rtol=1e-5, atol=1e-7 * float(reference.abs().max()))


def test_auto_compiles_once_eager_work_would_have_paid_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "COMPILE_AFTER_ELEMENTS", 3 * 2**20)
    kernel, x = CompiledKernel(kernels._phi_of_terms), torch.ones(2**20)
    with torch.no_grad():
        monkeypatch.setenv("SP_LIGHTNING_COMPILE", "never")
        assert not kernel.wanted(x)
        monkeypatch.setenv("SP_LIGHTNING_COMPILE", "auto")
        assert [kernel.wanted(x) for _ in range(4)] == [False, False, False, True]
        assert not kernel.wanted(torch.ones(kernels.MIN_FUSED_NUMEL - 1))  # small inputs stay eager
    assert not kernel.wanted(x)  # grad mode on: a higher-order graph may be recorded
    monkeypatch.setenv("SP_LIGHTNING_COMPILE", "sometimes")
    with pytest.raises(ValueError, match=r"SP_LIGHTNING_COMPILE='sometimes'.*\['always', 'auto', 'never'\]"):
        kernel.wanted(x)
