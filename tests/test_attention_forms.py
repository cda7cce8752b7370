"""Attention written in other forms than ``softmax(...) @ v``, and softmax outputs no rule can match.

The soft rule is value transport through frozen, softened weights: the cotangent
reaches the values through Ã = softmax(S / tau) and never reaches the scores. Every
softmax is either softened or reported, and the dispatch-level oracle agrees.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor
from torch.nn import functional as F

from _oracle import mismatch
from _support import Lambda, float64_default

from sp_lightning import UncoveredGatedOpWarning, coverage_report, soft_backward

TAU = 0.5


@pytest.fixture(autouse=True)
def float64() -> Iterator[None]:
    with float64_default():
        yield


def soft_vjp(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], seed: int = 0) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Output, upstream cotangent and the soft input cotangents (zeros where none flows)."""
    leaves = tuple(t.detach().clone().requires_grad_(True) for t in inputs)
    model = Lambda(fn)
    with soft_backward(model, {"attention": TAU}):
        out = model(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True, materialize_grads=True)
    return g, grads


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def check_report(fn: Callable[..., Tensor], inputs: tuple[Tensor, ...], softened: int) -> None:
    """Coverage report: ``softened`` attention ops, nothing uncovered, and the oracle agrees."""
    model = Lambda(lambda t: fn(*(t * 1 if i == 0 else x for i, x in enumerate(inputs))))
    report = coverage_report(model, inputs[0])
    assert report.softened.get("attention", 0) == softened and report.clean, str(report)
    assert not mismatch(model, inputs[0], report)


def test_transposed_form_cascaded_group_attention() -> None:
    """``v @ softmax(q^T k).transpose(-2, -1)``: the cotangent of v is g @ Ã; q and k get none."""
    q, k, v = randn(2, 4, 6, seed=1), randn(2, 4, 6, seed=2), randn(2, 3, 6, seed=3)

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        attn = (q.transpose(-2, -1) @ k).softmax(dim=-1)
        return v @ attn.transpose(-2, -1)

    g, (gq, gk, gv) = soft_vjp(fn, (q, k, v))
    softened = torch.softmax(q.transpose(-2, -1) @ k / TAU, dim=-1)
    torch.testing.assert_close(gv, g @ softened)
    assert not gq.any() and not gk.any()
    check_report(fn, (q, k, v), softened=1)


def test_factorised_attention() -> None:
    """CoaT: softmax over the tokens of k, then ``k^T v``, then ``q @ (k^T v)``: values get K̃ (q^T g)."""
    q, k, v = randn(2, 5, 4, seed=1), randn(2, 5, 4, seed=2), randn(2, 5, 3, seed=3)

    def fn(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_softmax = k.softmax(dim=1)
        return q @ (k_softmax.transpose(-1, -2) @ v)

    g, (gq, gk, gv) = soft_vjp(fn, (q, k, v))
    softened = torch.softmax(k / TAU, dim=1)
    torch.testing.assert_close(gv, softened @ (q.transpose(-1, -2) @ g))
    torch.testing.assert_close(gq, g @ (k.softmax(dim=1).transpose(-1, -2) @ v).transpose(-1, -2))  # plain: q is linear
    assert not gk.any()
    check_report(fn, (q, k, v), softened=1)


def test_separable_attention() -> None:
    """MobileViT v2: context scores softmax(query) weight a sum of keys; the keys get g * s̃, the query none."""
    query, key, value = randn(2, 1, 3, 7, seed=1), randn(2, 4, 3, 7, seed=2), randn(2, 4, 3, 7, seed=3)

    def fn(query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        context = (key * F.softmax(query, dim=-1)).sum(dim=-1, keepdim=True)
        return value * context.expand_as(value)

    g, (g_query, g_key, g_value) = soft_vjp(fn, (query, key, value))
    softened = torch.softmax(query / TAU, dim=-1)
    torch.testing.assert_close(g_key, (g * value).sum(-1, keepdim=True) * softened)
    assert not g_query.any()
    check_report(fn, (query, key, value), softened=1)


def test_casts_and_eval_dropout_pass_the_weights_on() -> None:
    """HF-style ``softmax(..., dtype=float32).to(dtype)`` then eval-mode dropout, then ``@ v``."""
    q, v = randn(2, 5, 4, seed=1), randn(2, 5, 3, seed=2)

    def fn(q: Tensor, v: Tensor) -> Tensor:
        attn = F.softmax(q @ q.transpose(-1, -2), dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.matmul(F.dropout(attn, 0.1, training=False), v)

    g, (_, gv) = soft_vjp(fn, (q, v))
    expected = torch.softmax(q @ q.transpose(-1, -2) / TAU, -1).transpose(-1, -2) @ g
    torch.testing.assert_close(gv, expected, rtol=1e-5, atol=1e-6)  # the weights went through float32
    check_report(fn, (q, v), softened=1)


UNMATCHED: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], str]] = {
    "einsum": (lambda q, v: torch.einsum("bij,bjd->bid", (q @ q.mT).softmax(-1), v), "torch.einsum"),
    "scaled by a number": (lambda q, v: (0.5 * (q @ q.mT).softmax(-1)) @ v, "Tensor.mul"),
    "a sum": (lambda q, v: (q @ q.mT).softmax(-1).sum(-1, keepdim=True) * v, "Tensor.sum"),
    "not over its dim": (lambda q, v: (q @ q.mT).softmax(-2) @ v, "Tensor.matmul"),
    "the output": (lambda q, v: torch.cat([(q @ q.mT).softmax(-1), v], -1), "torch.cat"),
    "returned as is": (lambda q, v: (q @ v.mT).softmax(-1), None),
}


@pytest.mark.parametrize("name", sorted(UNMATCHED))
def test_softmax_no_rule_matches_is_reported_and_warned(name: str) -> None:
    fn, consumer = UNMATCHED[name]
    v = randn(2, 5, 5, seed=2)
    model = Lambda(lambda q: fn(q * 1, v))
    x = randn(2, 5, 5, seed=1)
    report = coverage_report(model, x)
    expected = f"softmax weights used by {consumer}" if consumer else "softmax not used as attention weights"
    assert report.uncovered == {expected: 1} and "attention" not in report.softened, str(report)
    assert not mismatch(model, x, report)
    with soft_backward(model), pytest.warns(UncoveredGatedOpWarning, match="softmax"):
        model(x.clone().requires_grad_(True))


def test_attention_switched_off_is_reported_as_such() -> None:
    q, v = randn(2, 5, 4, seed=1), randn(2, 5, 3, seed=2)
    model = Lambda(lambda t: (t @ t.mT).softmax(-1) @ v)
    report = coverage_report(model, q, {"attention": None})
    assert report.switched_off == {"attention": 1} and report.clean
    assert not mismatch(model, q, report)
