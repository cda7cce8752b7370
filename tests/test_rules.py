"""Each soft rule's VJP against its formula in docs/method.md, computed independently (float64)."""

from __future__ import annotations

import math
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from _support import Lambda, float64_default

from sp_lightning import SoftRules, UncoveredGatedOpWarning, coverage_report, soft_backward
from sp_lightning.engine.rules import pooling, windows
from sp_lightning.engine.rules.interface import TINY



@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    with float64_default():
        yield


def vjp(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], v: Tensor, temperatures: dict | None = None,
        soft: bool = True, **options: object) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """Output and input cotangents of ``fn`` at ``inputs`` for upstream ``v``, soft or plain."""
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    model = Lambda(fn)
    if soft:
        with soft_backward(model, temperatures, **options):
            out = model(*leaves)
    else:
        out = model(*leaves)
    grads = torch.autograd.grad(out, leaves, v, allow_unused=True)
    return out.detach(), grads


def phi(z: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(z / math.sqrt(2)))


@pytest.fixture
def x() -> Tensor:
    return torch.randn(4, 5, 6, 7, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture
def v(x: Tensor) -> Tensor:
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(1))


RELU_FORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "F.relu": F.relu,
    "torch.relu": torch.relu,
    "Tensor.relu": lambda t: t.relu(),
    "nn.ReLU": nn.ReLU(),
    "F.relu inplace": lambda t: F.relu(t * 1, inplace=True),
    "nn.ReLU(inplace)": lambda t: nn.ReLU(inplace=True)(t * 1),
    "torch.relu_": lambda t: torch.relu_(t * 1),
    "Tensor.relu_": lambda t: (t * 1).relu_(),
}


@pytest.mark.parametrize("form", sorted(RELU_FORMS))
def test_relu_rule_is_v_times_phi(form: str, x: Tensor, v: Tensor) -> None:
    fn = RELU_FORMS[form]
    out, (g,) = vjp(fn, (x,), v, {"relu": 0.6})
    assert torch.equal(out, F.relu(x))
    # exact up to the flushed tail: gate values <= TINY are set to 0 (no subnormal floats)
    torch.testing.assert_close(g, v * phi(x / 0.6), rtol=1e-12, atol=TINY * v.abs().max())


class _ReluOfBatchNorms(nn.Module):
    """conv -> frozen eval BatchNorm (-> + a residual: identity, or a second conv -> BatchNorm) -> ReLU."""

    def __init__(self, residual: str) -> None:
        super().__init__()
        self.residual = residual
        self.convs = nn.ModuleList(nn.Conv2d(5, 5, 3, padding=1) for _ in range(2))
        self.bns = nn.ModuleList(nn.BatchNorm2d(5).eval() for _ in range(2))
        for bn in self.bns:
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 2)
        self.requires_grad_(False)

    def pre_activation(self, t: Tensor) -> Tensor:
        h = self.bns[0](self.convs[0](t))
        if self.residual == "identity":
            h = h + t
        elif self.residual == "batchnorm":
            h = h + self.bns[1](self.convs[1](t))
        return h

    def forward(self, t: Tensor) -> Tensor:
        return F.relu(self.pre_activation(t))


@pytest.mark.parametrize("residual", ["none", "identity", "batchnorm"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_eager_relu_after_batchnorms_hands_v_times_phi_to_their_inputs(
    residual: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The eager gate (recompute, erf, ``v + v * erf``, halved scales) equals v * Phi(x / tau) pulled
    back through the BatchNorms, for every recipe shape; in float32 its tail is exact zero, never a
    subnormal float."""
    monkeypatch.setenv("SP_LIGHTNING_COMPILE", "never")
    torch.manual_seed(0)
    model = _ReluOfBatchNorms(residual).to(dtype)
    x = (torch.randn(2, 5, 6, 6) * 4).to(dtype)
    v = torch.randn(2, 5, 6, 6).to(dtype)
    leaf = x.clone().requires_grad_(True)
    with soft_backward(model, {"relu": 0.6}):
        out = model(leaf)
    (g,) = torch.autograd.grad(out, leaf, v)
    reference = x.double().requires_grad_(True)
    h = model.double().pre_activation(reference)
    (expected,) = torch.autograd.grad(h, reference, v.double() * phi(h.detach() / 0.6))
    atol = (1e-6 if dtype == torch.float32 else 1e-12) * float(expected.abs().max())
    torch.testing.assert_close(g.double(), expected, rtol=0, atol=atol)
    if dtype == torch.float32:
        leaf = torch.linspace(-20, 20, 4001).requires_grad_(True)
        relu = Lambda(F.relu)
        with soft_backward(relu, {"relu": 0.6}):
            (g,) = torch.autograd.grad(relu(leaf), leaf, torch.ones(4001))
        assert not bool(((g != 0) & (g.abs() < torch.finfo(torch.float32).tiny)).any())
        assert bool((g[:1000] == 0).all()) and bool((g[-1000:] == 1).all())


class CopyCounter(TorchDispatchMode):
    """Counts the kernels that copy a tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.copies = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.copies += func.overloadpacket.__name__ in ("clone", "copy_")
        return func(*args, **(kwargs or {}))


def test_inplace_relu_without_recipe_derives_its_gate_in_the_forward_instead_of_copying(x: Tensor, v: Tensor) -> None:
    """x is about to be overwritten: the rule keeps its gate (same memory as a copy of x, one pass fewer)."""
    leaf = x.clone().requires_grad_(True)
    model = Lambda(lambda t: F.relu(t * 1, inplace=True))
    with soft_backward(model, {"relu": 0.6}), CopyCounter() as counter:
        out = model(leaf)
    assert counter.copies == 0
    first = torch.autograd.grad(out, leaf, v, retain_graph=True)[0]
    second = torch.autograd.grad(out, leaf, v)[0]  # the kept gate was not overwritten by the first
    torch.testing.assert_close(first, v * phi(x / 0.6), rtol=1e-12, atol=TINY * v.abs().max())
    assert torch.equal(first, second)


def test_inplace_relu_keeps_inplace_semantics(x: Tensor) -> None:
    """The input of an in-place activation is overwritten, as without the rule."""
    def fn(t: Tensor) -> Tensor:
        y = t * 1
        F.relu(y, inplace=True)
        return y  # the caller relies on the in-place write, not on the return value

    out, (g,) = vjp(fn, (x,), torch.ones_like(x))
    assert torch.equal(out, F.relu(x))
    torch.testing.assert_close(g, phi(x / 0.6))


GATES: dict[str, tuple[Callable[[Tensor], Tensor], str, float, Callable[[Tensor, float], Tensor]]] = {
    # name: (forward, rule, tau, expected surrogate derivative)
    "gelu": (F.gelu, "gelu", 1.0, lambda t, tau: phi(t / tau)),
    "gelu_tanh": (lambda t: F.gelu(t, approximate="tanh"), "gelu", 0.7, lambda t, tau: phi(t / tau)),
    "nn.GELU": (nn.GELU(), "gelu", 1.0, lambda t, tau: phi(t / tau)),
    "silu": (F.silu, "silu", 1.6, lambda t, tau: torch.sigmoid(t / tau)),
    "nn.SiLU(inplace)": (lambda t: nn.SiLU(inplace=True)(t * 1), "silu", 1.6, lambda t, tau: torch.sigmoid(t / tau)),
    "leaky_relu": (lambda t: F.leaky_relu(t, 0.2), "leaky_relu", 0.6, lambda t, tau: 0.2 + 0.8 * phi(t / tau)),
    "relu6": (F.relu6, "hardtanh", 0.6, lambda t, tau: phi(t / tau) - phi((t - 6) / tau)),
    "hardtanh": (lambda t: F.hardtanh(t, -2.0, 1.5), "hardtanh", 0.5,
                 lambda t, tau: phi((t + 2) / tau) - phi((t - 1.5) / tau)),
    "elu": (lambda t: F.elu(t, 0.7), "elu", 0.6,
            lambda t, tau: phi(t / tau) + (1 - phi(t / tau)) * 0.7 * torch.exp(t.clamp(max=0))),
    "mish": (F.mish, "mish", 1.6, lambda t, tau: torch.tanh(F.softplus(t / tau))),
    "hardsigmoid": (F.hardsigmoid, "hardsigmoid", 1.0, lambda t, tau: (phi((t + 3) / tau) - phi((t - 3) / tau)) / 6),
}


@pytest.mark.parametrize("name", sorted(GATES))
def test_gate_rules_match_formula(name: str, x: Tensor, v: Tensor) -> None:
    fn, rule, tau, expected = GATES[name]
    out, (g,) = vjp(fn, (x,), v, {rule: tau})
    assert torch.equal(out, fn(x))
    torch.testing.assert_close(g, v * expected(x, tau), rtol=1e-10, atol=TINY * v.abs().max())


def test_hardswish_gate_is_gaussian_smoothed_hardsigmoid(x: Tensor, v: Tensor) -> None:
    """E[hardsigmoid(x + tau*eps)], checked against numerical integration over eps."""
    tau = 1.0
    _, (g,) = vjp(F.hardswish, (x,), v, {"hardswish": tau})
    eps = torch.linspace(-8, 8, 4001)
    weights = torch.exp(-0.5 * eps**2)
    weights = weights / weights.sum()
    smoothed = (F.hardsigmoid(x.unsqueeze(-1) + tau * eps) * weights).sum(-1)
    torch.testing.assert_close(g, v * smoothed, rtol=1e-5, atol=1e-6)  # quadrature error ~1e-7


def test_gate_tails_are_flushed_to_zero_not_subnormal() -> None:
    """Far tails become exact zeros (like the plain ReLU), never subnormal floats that slow CPU kernels."""
    x = torch.linspace(-30, 0, 301, dtype=torch.float32)
    _, (g,) = vjp(F.relu, (x,), torch.ones_like(x))
    assert not ((g != 0) & (g.abs() < torch.finfo(torch.float32).tiny)).any()
    assert (g[x < -5] == 0).all() and (g[x > -3] > 0).all()


def test_relu_small_tau_recovers_gradient(x: Tensor, v: Tensor) -> None:
    _, (soft,) = vjp(F.relu, (x,), v, {"relu": 1e-8})
    _, (plain,) = vjp(F.relu, (x,), v, soft=False)
    assert torch.equal(soft, plain)


def test_relu_large_tau_tends_to_half(x: Tensor, v: Tensor) -> None:
    _, (soft,) = vjp(F.relu, (x,), v, {"relu": 1e9})
    torch.testing.assert_close(soft, 0.5 * v)


@pytest.mark.parametrize("rule,fn", [("relu", F.relu), ("gelu", F.gelu), ("silu", F.silu), ("layernorm",
                         lambda t: F.layer_norm(t, t.shape[-1:]))])
def test_rule_off_recovers_plain_gradient(rule: str, fn: Callable[[Tensor], Tensor], x: Tensor, v: Tensor) -> None:
    _, (off,) = vjp(fn, (x,), v, {rule: None})
    _, (plain,) = vjp(fn, (x,), v, soft=False)
    assert torch.equal(off, plain)


# --------------------------------------------------------------------------- max-pool


def naive_soft_maxpool(x: Tensor, v: Tensor, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int],
                       d: tuple[int, int], tau: float, fill: float) -> Tensor:
    """Reference: loop over output positions; each window's softmax(x/tau) routes v."""
    grad = torch.zeros_like(x)
    oh, ow = v.shape[-2:]
    h, w = x.shape[-2:]
    for i in range(oh):
        for j in range(ow):
            rows = [i * s[0] - p[0] + a * d[0] for a in range(k[0])]
            cols = [j * s[1] - p[1] + b * d[1] for b in range(k[1])]
            vals, where = [], []
            for r in rows:
                for c in cols:
                    inside = 0 <= r < h and 0 <= c < w
                    vals.append(x[..., r, c] / tau if inside else torch.full(x.shape[:-2], fill / tau if fill else fill))
                    where.append((r, c) if inside else None)
            weights = torch.softmax(torch.stack(vals, -1), -1)
            for n, pos in enumerate(where):
                if pos is not None:
                    grad[..., pos[0], pos[1]] += weights[..., n] * v[..., i, j]
    return grad


POOLS = {
    "k3s2p1": dict(kernel_size=3, stride=2, padding=1),
    "k2s2": dict(kernel_size=2, stride=2),
    "k2s2_tiles": dict(kernel_size=2, stride=2),  # on an 8x8 input: windows tile it exactly
    "k3s1p1_dil2": dict(kernel_size=3, stride=1, padding=1, dilation=2),
    "k3s2_ceil": dict(kernel_size=3, stride=2, ceil_mode=True),
    "k3s2p1_ceil": dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    "k2x3_s1x2_p1x0": dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)),
}


@pytest.mark.parametrize("name", sorted(POOLS))
@pytest.mark.parametrize("padding_mode", ["neginf", "zeros"])
def test_maxpool_routes_v_through_softmax_windows(name: str, padding_mode: str) -> None:
    cfg = POOLS[name]
    rows = 8 if name.endswith("_tiles") else 7
    x = torch.randn(2, 3, rows, 8, generator=torch.Generator().manual_seed(2))
    out_plain = F.max_pool2d(x, **cfg)
    v = torch.randn(out_plain.shape, generator=torch.Generator().manual_seed(3))
    out, (g,) = vjp(lambda t: F.max_pool2d(t, **cfg), (x,), v, {"maxpool": 0.3}, maxpool_padding=padding_mode)
    assert torch.equal(out, out_plain)
    k = cfg["kernel_size"] if isinstance(cfg["kernel_size"], tuple) else (cfg["kernel_size"],) * 2
    s = cfg.get("stride", k)
    s = s if isinstance(s, tuple) else (s, s)
    p = cfg.get("padding", 0)
    p = p if isinstance(p, tuple) else (p, p)
    dil = cfg.get("dilation", 1)
    expected = naive_soft_maxpool(x, v, k, s, p, (dil, dil), 0.3, float("-inf") if padding_mode == "neginf" else 0.0)
    torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("name", ["k2s2_tiles", "k3s2p1"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_maxpool_kept_routing_serves_several_passes_in_either_memory_layout(name: str, layout: str) -> None:
    """Kept window weights (several targets) are read, not overwritten, by each backward pass; owned
    ones (one target) take the result in place, on tiling windows through their ``columns`` buffer."""
    cfg = POOLS[name]
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    v = torch.randn(F.max_pool2d(x, **cfg).shape, generator=torch.Generator().manual_seed(3))
    k, st, pad = (cfg["kernel_size"],) * 2, (cfg["stride"],) * 2, (cfg.get("padding", 0),) * 2
    expected = naive_soft_maxpool(x, v, k, st, pad, (1, 1), 0.3, float("-inf"))
    for keep in (False, True):
        leaf = x.clone().requires_grad_(True)
        model = Lambda(lambda t: F.max_pool2d(t, **cfg))
        with soft_backward(model, replace(SoftRules.create({"maxpool": 0.3}), keep_derived=keep)):
            out = model(leaf)
        for _ in range(2 if keep else 1):
            (g,) = torch.autograd.grad(out, leaf, v, retain_graph=keep)
            torch.testing.assert_close(g, expected)


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (3, 8, 8)])
def test_maxpool_stem_windows_on_even_sizes_add_even_and_odd_positions(
    shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ResNet's stem pool (3x3, stride 2, padding 1) on even sizes takes its window sums and their
    transpose from adds on the even and odd positions, and matches the reference."""
    used: list[str] = []

    def spy(module: Any, name: str) -> None:
        original = getattr(module, name)

        def counted(*args: Any) -> Tensor:
            used.append(name)
            return original(*args)

        monkeypatch.setattr(module, name, counted)

    spy(windows, "halving_sums")  # called by the window sums there
    spy(pooling, "halving_spread_times")  # called by the separable routing
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8)) * 2
    v = torch.randn(F.max_pool2d(x, 3, 2, 1).shape, generator=torch.Generator().manual_seed(9))
    _, (g,) = vjp(lambda t: F.max_pool2d(t, 3, 2, 1), (x,), v, {"maxpool": 0.3})
    torch.testing.assert_close(g, naive_soft_maxpool(x, v, (3, 3), (2, 2), (1, 1), (1, 1), 0.3, float("-inf")))
    assert set(used) == {"halving_sums", "halving_spread_times"}


@pytest.mark.parametrize(
    ("kernel", "shape"), [((3, 3), (2, 3, 9, 6)), ((1, 2), (2, 3, 4, 6)), ((2, 2), (2, 3, 4, 2)), ((2, 1), (2, 3, 4, 1))]
)
def test_maxpool_tiling_windows_of_other_sizes(kernel: tuple[int, int], shape: tuple[int, ...]) -> None:
    """Tiling windows other than 2x2 (the window totals add every offset: three, or one row), and a
    single column of windows, whose values repeated over the columns must be a buffer of their own: the
    pooled output the backward reads its shift from stays as the forward made it."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(10))
    v = torch.randn(F.max_pool2d(x, kernel).shape, generator=torch.Generator().manual_seed(11))
    out, (g,) = vjp(lambda t: F.max_pool2d(t, kernel), (x,), v, {"maxpool": 0.3})
    torch.testing.assert_close(g, naive_soft_maxpool(x, v, kernel, kernel, (0, 0), (1, 1), 0.3, float("-inf")))
    assert torch.equal(out, F.max_pool2d(x, kernel))


@pytest.mark.parametrize("shape", [(2, 3, 8, 6), (2, 3, 4, 2)])
def test_maxpool_tiling_windows_while_a_higher_order_graph_is_recorded(shape: tuple[int, ...]) -> None:
    """Under ``create_graph`` the tiling routing takes its out-of-place form (``out=`` records no
    graph): the same values as the reference, a differentiable result, the pooled output untouched."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(12))
    v = torch.randn(F.max_pool2d(x, 2).shape, generator=torch.Generator().manual_seed(13))
    leaf, model = x.clone().requires_grad_(True), Lambda(lambda t: F.max_pool2d(t, 2))
    with soft_backward(model, {"maxpool": 0.3}):
        out = model(leaf)
    (g,) = torch.autograd.grad(out, leaf, v, create_graph=True)
    assert g.requires_grad
    torch.testing.assert_close(g, naive_soft_maxpool(x, v, (2, 2), (2, 2), (0, 0), (1, 1), 0.3, float("-inf")))
    assert torch.equal(out.detach(), F.max_pool2d(x, 2))


def test_maxpool_tiling_windows_take_any_dynamic_range() -> None:
    """Each tiling window is shifted by its own maximum: a channel spanning 1e4 (one shift per channel
    would underflow its other windows' denominators) and a window with a far tail match the reference."""
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float32)
    x[0, 0] *= 1e4
    x[0, 1, 0, 0] = -50.0  # its weight exp(-50 / 0.3) is far below the flush threshold
    v = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float32)
    _, (g,) = vjp(lambda t: F.max_pool2d(t, 2), (x,), v, {"maxpool": 0.3})
    expected = naive_soft_maxpool(x.double(), v.double(), (2, 2), (2, 2), (0, 0), (1, 1), 0.3, -math.inf)
    torch.testing.assert_close(g, expected.float())
    assert g[0, 1, 0, 0] == 0.0


def test_maxpool_module_with_indices_and_unbatched_input() -> None:
    x = torch.randn(3, 6, 6)
    pool = nn.MaxPool2d(2, return_indices=True)
    out, (g,) = vjp(lambda t: pool(t)[0], (x,), torch.ones(3, 3, 3))
    assert torch.equal(out, pool(x)[0])
    expected = naive_soft_maxpool(x.unsqueeze(0), torch.ones(1, 3, 3, 3), (2, 2), (2, 2), (0, 0), (1, 1), 0.3, -math.inf)
    torch.testing.assert_close(g, expected[0])


def test_maxpool_neginf_padding_sends_nothing_to_padding() -> None:
    """At a border, the soft window's weights over real inputs sum to one (no leak into padding)."""
    x = torch.randn(1, 1, 5, 5)
    _, (g,) = vjp(lambda t: F.max_pool2d(t, 3, 3, 1), (x,), torch.ones(1, 1, 2, 2))
    torch.testing.assert_close(g.sum(), torch.tensor(4.0))
    _, (gz,) = vjp(lambda t: F.max_pool2d(t, 3, 3, 1), (x,), torch.ones(1, 1, 2, 2), maxpool_padding="zeros")
    assert gz.sum() < 4.0


# --------------------------------------------------------------------------- attention


def softened_attention(q: Tensor, k: Tensor, scale: float, tau: float, bias: Tensor | float = 0.0) -> Tensor:
    return torch.softmax((q @ k.transpose(-2, -1) * scale + bias) / tau, dim=-1)


def qkv(seed: int = 4, heads: int = 2, kv_heads: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, 5, 8, generator=gen)
    k = torch.randn(2, kv_heads or heads, 6, 8, generator=gen)
    v = torch.randn(2, kv_heads or heads, 6, 4, generator=gen)
    return q, k, v


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_sdpa_sends_softened_attention_transpose_v_to_values_only(tau: float) -> None:
    q, k, val = qkv()
    up = torch.randn(2, 2, 5, 4)
    out, (gq, gk, gv) = vjp(F.scaled_dot_product_attention, (q, k, val), up, {"attention": tau})
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, val))
    assert gq is None and gk is None
    expected = softened_attention(q, k, 8 ** -0.5, tau).transpose(-2, -1) @ up
    torch.testing.assert_close(gv, expected)


def test_sdpa_masks_scale_and_causal() -> None:
    q, k, val = qkv()
    up = torch.randn(2, 2, 5, 4)
    bool_mask = torch.rand(5, 6, generator=torch.Generator().manual_seed(5)) > 0.3
    bool_mask[:, 0] = True
    float_mask = torch.randn(5, 6)
    cases = {
        "bool": (dict(attn_mask=bool_mask), torch.zeros(5, 6).masked_fill(~bool_mask, -math.inf)),
        "float": (dict(attn_mask=float_mask), float_mask),
        "causal": (dict(is_causal=True), torch.zeros(5, 6).masked_fill(~torch.ones(5, 6, dtype=torch.bool).tril(), -math.inf)),
    }
    for name, (kw, bias) in cases.items():
        _, (_, _, gv) = vjp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, scale=0.3, **kw), (q, k, val), up,
                            {"attention": 0.5})
        expected = softened_attention(q, k, 0.3, 0.5, bias).transpose(-2, -1) @ up
        torch.testing.assert_close(gv, expected, msg=name)


def test_sdpa_grouped_query_attention() -> None:
    q, k, val = qkv(heads=4, kv_heads=2)
    up = torch.randn(2, 4, 5, 4)
    _, (_, _, gv) = vjp(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, enable_gqa=True), (q, k, val), up)
    attn = softened_attention(q, k.repeat_interleave(2, dim=1), 8 ** -0.5, 1.0)
    expected = (attn.transpose(-2, -1) @ up).unflatten(1, (2, 2)).sum(2)
    torch.testing.assert_close(gv, expected)


def hand_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention written by hand, as in Swin: scores, softmax (nn.Softmax), dropout in eval, matmul."""
    scores = (q * 8 ** -0.5) @ k.transpose(-2, -1)
    attn = nn.Softmax(dim=-1)(scores)
    attn = F.dropout(attn, 0.1, training=False)
    return attn @ v


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_hand_written_softmax_attention(tau: float) -> None:
    q, k, val = qkv()
    up = torch.randn(2, 2, 5, 4)
    out, (gq, gk, gv) = vjp(hand_attention, (q, k, val), up, {"attention": tau})
    assert torch.equal(out, hand_attention(q, k, val))
    assert gq is None and gk is None
    expected = softened_attention(q, k, 8 ** -0.5, tau).transpose(-2, -1) @ up
    torch.testing.assert_close(gv, expected)


@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_module(need_weights: bool) -> None:
    """nn.MultiheadAttention: the input cotangent flows only through the value projection."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    up = torch.randn(2, 5, 8)
    out, (g,) = vjp(lambda t: mha(t, t, t, need_weights=need_weights)[0], (x,), up, {"attention": 0.5})
    assert torch.equal(out, mha(x, x, x, need_weights=need_weights)[0])

    w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
    heads = lambda t: t.unflatten(-1, (2, 4)).transpose(1, 2)  # noqa: E731
    q, k = heads(x @ w_q.T + b_q), heads(x @ w_k.T + b_k)
    attn = softened_attention(q, k, 4 ** -0.5, 0.5)
    g_heads = heads(up @ mha.out_proj.weight)  # cotangent of the per-head attention output
    g_values = (attn.transpose(-2, -1) @ g_heads).transpose(1, 2).flatten(-2)
    torch.testing.assert_close(g, g_values @ w_v)


# --------------------------------------------------------------------------- normalisation


def test_layernorm_statistics_constant(x: Tensor, v: Tensor) -> None:
    ln = nn.LayerNorm(7)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    out, (g,) = vjp(ln, (x,), v)
    assert torch.equal(out, ln(x))
    rstd = 1 / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + ln.eps)
    torch.testing.assert_close(g, v * ln.weight * rstd)


def test_layernorm_parameter_gradients_are_exact(x: Tensor, v: Tensor) -> None:
    ln = nn.LayerNorm((6, 7))
    with soft_backward(ln):
        soft_w, soft_b = torch.autograd.grad(ln(x), (ln.weight, ln.bias), v)
    plain_w, plain_b = torch.autograd.grad(ln(x), (ln.weight, ln.bias), v)
    torch.testing.assert_close(soft_w, plain_w)
    torch.testing.assert_close(soft_b, plain_b)


def test_channel_layernorm_2d_as_in_convnext(x: Tensor, v: Tensor) -> None:
    """LayerNorm over channels of an NCHW tensor (permute, F.layer_norm, permute back)."""
    weight = torch.rand(5) + 0.5

    def ln2d(t: Tensor) -> Tensor:
        return F.layer_norm(t.permute(0, 2, 3, 1), (5,), weight, None, 1e-6).permute(0, 3, 1, 2)

    _, (g,) = vjp(ln2d, (x,), v)
    rstd = 1 / torch.sqrt(x.var(1, unbiased=False, keepdim=True) + 1e-6)
    torch.testing.assert_close(g, v * weight.view(1, 5, 1, 1) * rstd)


def test_groupnorm_statistics_constant(x: Tensor, v: Tensor) -> None:
    gn = nn.GroupNorm(1, 5)  # 5 channels in one group
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
    out, (g,) = vjp(gn, (x,), v)
    assert torch.equal(out, gn(x))
    rstd = 1 / torch.sqrt(x.flatten(1).var(1, unbiased=False) + gn.eps).view(-1, 1, 1, 1)
    torch.testing.assert_close(g, v * gn.weight.view(1, 5, 1, 1) * rstd)
    with soft_backward(gn):
        soft_w = torch.autograd.grad(gn(x), gn.weight, v)[0]
    torch.testing.assert_close(soft_w, torch.autograd.grad(gn(x), gn.weight, v)[0])


def test_rmsnorm_statistics_constant(x: Tensor, v: Tensor) -> None:
    weight = torch.rand(7) + 0.5
    out, (g,) = vjp(lambda t: F.rms_norm(t, (7,), weight, 1e-6), (x,), v)
    rrms = 1 / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(g, v * weight * rrms)


# --------------------------------------------------------------------------- memory recipes


def test_batchnorm_recipe_matches_stored_input() -> None:
    """ReLU after eval BatchNorm (+ residual, in place) recomputes its input; result as if it stored it."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3).eval()
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)

    def block(t: Tensor) -> Tensor:
        out = bn(conv(t))
        out += t
        return F.relu(out, inplace=True)

    def reference(t: Tensor) -> Tensor:
        pre = bn(conv(t)) + t
        return F.relu(pre + 0.0)  # "+ 0.0" breaks the recipe chain: the rule stores pre

    x = torch.randn(2, 3, 6, 6)
    up = torch.randn(2, 3, 6, 6)
    out, (g,) = vjp(block, (x,), up)
    out_ref, (g_ref,) = vjp(reference, (x,), up)
    assert torch.equal(out, block(x.clone()))
    torch.testing.assert_close(g, g_ref)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen", "trainable"])
def test_cotangent_skips_frozen_batchnorms_and_only_those(trainable: bool) -> None:
    """After a frozen eval BatchNorm (+ residual), the soft ReLU hands its cotangent straight to the
    BatchNorm's input, scaled, so no BatchNorm backward runs. Parameters that want a gradient keep
    the ordinary path, and every gradient equals the one through a stored, recipe-free input."""
    torch.manual_seed(0)
    convs, bns = [nn.Conv2d(3, 3, 3, padding=1) for _ in range(2)], [nn.BatchNorm2d(3).eval() for _ in range(2)]
    params = [p for m in convs + bns for p in m.parameters()]
    for bn in bns:
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    for p in params:
        p.requires_grad_(trainable)

    def block(t: Tensor, chain: bool) -> Tensor:
        h = bns[0](convs[0](t))
        h = F.relu(h if chain else h + 0.0, inplace=True)  # "+ 0.0" breaks the recipe: the rule stores x
        out = bns[1](convs[1](h))
        out += t
        return F.relu(out if chain else out + 0.0, inplace=True)

    x, up = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    results = []
    for chain in (True, False):
        leaf = x.clone().requires_grad_(True)
        model = Lambda(lambda t: block(t, chain))
        with soft_backward(model):
            out = model(leaf)
        with OpCounter() as counter:
            grads = torch.autograd.grad(out, [leaf] + [p for p in params if p.requires_grad], up)
        results.append((grads, counter.ops["native_batch_norm_backward"]))
    (folded, skipped), (reference, plain) = results
    assert plain == 2 and skipped == (2 if trainable else 0)
    assert len(folded) == (1 + len(params) if trainable else 1)
    for g, ref in zip(folded, reference):
        torch.testing.assert_close(g, ref)


def test_train_mode_batchnorm_recipe_recomputes_x_from_the_batch_statistics() -> None:
    """A train-mode BatchNorm's batch statistics (saved by its own backward) give the in-place ReLU
    after it a recipe: no gate is derived in the forward, and every gradient, parameters included,
    equals the one through a stored, recipe-free input."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4).train()

    def block(t: Tensor, chain: bool) -> Tensor:
        h = bn(conv(t))
        return F.relu(h if chain else h + 0.0, inplace=True)  # "+ 0.0": no recipe

    x, up = torch.randn(3, 3, 6, 6), torch.randn(3, 4, 6, 6)
    results = []
    for chain in (True, False):
        leaf = x.clone().requires_grad_(True)
        model = Lambda(lambda t: block(t, chain))
        with soft_backward(model), OpCounter() as counter:
            out = model(leaf)
        params = list(conv.parameters()) + list(bn.parameters())
        results.append((torch.autograd.grad(out, [leaf] + params, up), counter.ops["erf_"]))
    (recomputed, forward_gates), (reference, reference_gates) = results
    assert forward_gates == 0 and reference_gates == 1
    for g, ref in zip(recomputed, reference):
        torch.testing.assert_close(g, ref)


# --------------------------------------------------------------------------- configuration and coverage


def test_unknown_rule_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match="valid names are .*'relu'"):
        SoftRules.create({"rleu": 0.5})


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_nonpositive_temperature_is_rejected(bad: float) -> None:
    with pytest.raises(ValueError, match="> 0"):
        SoftRules.create({"relu": bad})


def test_untempered_rule_takes_on_or_off() -> None:
    assert SoftRules.create({"layernorm": None}).tau("layernorm") is None
    with pytest.raises(ValueError, match="no temperature"):
        SoftRules.create({"layernorm": 0.5})


def test_bad_maxpool_padding_is_rejected() -> None:
    with pytest.raises(ValueError, match="neginf"):
        SoftRules.create(maxpool_padding="reflect")  # type: ignore[arg-type]


def test_uncovered_gated_op_is_reported_and_warned() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.PReLU(), nn.ReLU(), nn.Linear(4, 2))
    report = coverage_report(model, torch.randn(3, 4))
    assert report.uncovered == {"prelu": 1}
    assert report.softened == {"relu": 1}
    assert not report.clean
    assert "NO RULE" in str(report) and "prelu" in str(report)
    with pytest.warns(UncoveredGatedOpWarning, match="prelu"):
        with soft_backward(model):
            model(torch.randn(3, 4, requires_grad=True)).sum().backward()


def test_switched_off_rules_are_reported() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.GELU())
    report = coverage_report(model, torch.randn(3, 4), {"gelu": None})
    assert report.softened == {"relu": 1} and report.switched_off == {"gelu": 1} and report.clean


@pytest.mark.parametrize("size", [7, 8])
def test_maxpool_extreme_dynamic_range_falls_back_exactly(size: int) -> None:
    """Windows far below their channel's maximum would underflow the fast path: results stay exact."""
    x = torch.randn(1, 2, size, size, generator=torch.Generator().manual_seed(6))
    x[0, 0, 0, 0] = 500.0  # exp((x - 500) / 0.3) underflows everywhere else in channel 0
    v = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    _, (g,) = vjp(lambda t: F.max_pool2d(t.float(), 3, 2, 1).to(t.dtype), (x,), v.float().double())
    expected = naive_soft_maxpool(x, v, (3, 3), (2, 2), (1, 1), (1, 1), 0.3, float("-inf"))
    torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-6)


def test_param_grads_off_skips_parameter_gradients_only(x: Tensor, v: Tensor) -> None:
    """Explainers need input gradients only; the norm rules then leave parameters out of the graph."""
    from dataclasses import replace

    ln = nn.LayerNorm(7)
    leaf = x.clone().requires_grad_(True)
    with soft_backward(ln, replace(SoftRules.create(), param_grads=False)):
        out = ln(leaf)
    g_input, g_weight = torch.autograd.grad(out, (leaf, ln.weight), v, allow_unused=True)
    assert g_weight is None
    _, (expected,) = vjp(ln, (x,), v)
    torch.testing.assert_close(g_input, expected)


@pytest.mark.parametrize("window", [(2, 2, 0), (3, 2, 1)], ids=["tiling", "separable"])
def test_maxpool_backward_reuses_the_pooled_output_a_sequential_dropped(window: tuple[int, int, int]) -> None:
    """In a ``Sequential`` the pooled output's Python tensor dies once the next layer has run (that
    layer saves only the C++ tensor); the backward still reads the forward's output instead of
    running the max-pool again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.MaxPool2d(*window), nn.Conv2d(4, 2, 3, padding=1))
    leaf = torch.randn(2, 3, 8, 8).requires_grad_(True)
    with soft_backward(model):
        out = model(leaf)
    with OpCounter() as counter:
        torch.autograd.grad(out.sum(), leaf)
    assert counter.ops["max_pool2d_with_indices"] == counter.ops["max_pool2d"] == 0
    assert counter.ops["convolution_backward"] == 2  # the counter saw the backward


def test_maxpool_output_changed_in_place_afterwards() -> None:
    """``x = pool(x); x += skip`` (as in Xception) is allowed by the plain max-pool; the soft rule recomputes
    the pooled output it needs instead of failing, and matches the out-of-place form."""
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    skip = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))

    def run(in_place: bool) -> Tensor:
        leaf = x.clone().requires_grad_(True)

        def fn(t: Tensor) -> Tensor:
            pooled = F.max_pool2d(t, 3, 2, 1)
            return (pooled.add_(skip) if in_place else pooled + skip).relu()

        model = Lambda(fn)
        with soft_backward(model):
            out = model(leaf)
        return torch.autograd.grad(out.sum(), leaf)[0]

    torch.testing.assert_close(run(True), run(False))


def _conv_bn_relu_pool() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 2, 3, padding=1)).eval()


def test_backward_frees_what_the_rules_held_while_the_graph_lives() -> None:
    """Like autograd's saved tensors, what a soft rule holds (the recipe's BatchNorm input, the pooled
    output) is freed once its backward has run, not when the whole graph is dropped."""
    torch.manual_seed(0)
    model = _conv_bn_relu_pool()
    held: dict[str, weakref.ref] = {}

    def keep_weakref(name: str) -> Callable[[nn.Module, Any, Tensor], None]:
        def hook(module: nn.Module, inputs: Any, output: Tensor) -> None:
            held[name] = weakref.ref(output)
        return hook

    model[0].register_forward_hook(keep_weakref("conv"))
    model[3].register_forward_hook(keep_weakref("pooled"))
    leaf = torch.randn(2, 3, 8, 8).requires_grad_(True)
    with soft_backward(model):
        out = model(leaf)
    assert held["conv"]() is not None and held["pooled"]() is not None  # the graph holds them
    torch.autograd.grad(out.sum(), leaf)
    assert out.grad_fn is not None  # the graph itself is still alive
    assert held["conv"]() is None and held["pooled"]() is None


@pytest.mark.parametrize("rule", ["relu", "maxpool"])
def test_second_backward_needs_retain_graph(rule: str) -> None:
    """With ``retain_graph=True`` the rules keep what they hold and serve another backward (same result);
    without it, a second backward is refused with a message naming the fix, not run on freed values."""
    torch.manual_seed(0)
    model = Lambda(lambda t: F.relu(t * 2)) if rule == "relu" else Lambda(lambda t: F.max_pool2d(t * 2, 3, 2, 1))
    leaf = torch.randn(2, 3, 8, 8).requires_grad_(True)
    with soft_backward(model):
        out = model(leaf).sum()
    first = torch.autograd.grad(out, leaf, retain_graph=True)[0]
    second = torch.autograd.grad(out, leaf)[0]
    assert torch.equal(first, second)
    with pytest.raises(RuntimeError, match="a soft rule a second time.*retain_graph=True"):
        torch.autograd.grad(out, leaf)
