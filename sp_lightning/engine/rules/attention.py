"""Attention as value transport through frozen, softened weights (docs/method.md section 2), and its handlers.

For ``out = softmax(S) V`` the soft VJP sends ``Ã^T v`` to V with
``Ã = sg(softmax(S / tau))`` and nothing to S (so nothing to Q or K).

Covered forms:

* ``F.scaled_dot_product_attention`` (fused kernels serve the forward; the
  backward rebuilds Ã from the saved Q and K, mask and scale), and
  ``nn.MultiheadAttention``, whose functional body is run op by op;
* softmax weights written by hand and consumed by a product that sums over the
  softmax's dim: ``softmax(S) @ V`` (Swin, timm without fused attention), the
  transposed form ``V @ softmax(S).transpose(-2, -1)`` (cascaded group
  attention), factorised attention ``softmax(K, dim=tokens).transpose(-2, -1) @ V``
  (CoaT), and the elementwise ``V * softmax(S)`` of separable attention
  (MobileViT v2), whose sum follows. Ã is rebuilt from the softmax output A
  alone (softmax(S / tau) is A^(1/tau) renormalised), so no logits are kept.

Every softmax is accounted for when the forward ends (``Scope.defer``): one that
reached such a product is counted as softened attention (also when its weights
are returned besides); one whose output went only elsewhere (an einsum, a sum,
the model's output) is reported as uncovered.
Transposes, permutes, dtype casts, copies and eval-mode dropout pass the weights
on without consuming them.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .interface import TINY, Handler, Scope, arg, derived, flush_tiny_, needs_soft

_TAG = "_sp_weights"
_MT = Tensor.mT.__get__  # ``t.mT`` reaches the engine as this getter


# --------------------------------------------------------------------------- softened weights


def soften(weights: Tensor, tau: float, dim: int = -1) -> Tensor:
    """softmax(S / tau) from A = softmax(S) along ``dim`` (A^(1/tau), renormalised), tails flushed."""
    if tau == 1.0:
        return torch.threshold(weights, TINY, 0.0)  # a copy: ``weights`` is also saved by the softmax
    powered = weights.pow(1.0 / tau)
    total = powered.sum(dim, keepdim=True).clamp_min(torch.finfo(powered.dtype).tiny)
    return flush_tiny_(powered.div_(total))


def _sum_to_shape(t: Tensor, shape: torch.Size) -> Tensor:
    """Undo broadcasting (batch dimensions of a matmul, size-1 dims of a product)."""
    return t if t.shape == shape else t.sum_to_size(shape)


@dataclass(frozen=True, eq=False)
class SDPASettings:
    """The non-tensor arguments of one ``SoftSDPA`` call."""

    call: Callable[[Tensor, Tensor, Tensor], Tensor]
    is_causal: bool
    scale: float | None
    tau: float
    keep: bool


class SoftSDPA(torch.autograd.Function):
    """Fused scaled-dot-product attention forward; value-transport backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, settings: SDPASettings
    ) -> Tensor:
        out = settings.call(q, k, v)
        ctx.save_for_backward(q, k, attn_mask)
        ctx.settings, ctx.value_shape, ctx.keep = settings, v.shape, settings.keep
        return out

    @staticmethod
    def _softened(ctx: Any) -> Tensor:
        """Ã = softmax(Q K^T s / tau) with the forward's mask, rebuilt from the saved Q and K."""
        q, k, attn_mask = ctx.saved_tensors
        settings: SDPASettings = ctx.settings
        if q.dim() >= 3 and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)  # grouped-query attention
        scale = settings.scale if settings.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        logits = (q @ k.transpose(-2, -1)).mul_(scale / settings.tau)
        if settings.is_causal:
            length, source = logits.shape[-2:]
            keep = torch.ones(length, source, dtype=torch.bool, device=logits.device).tril()
            logits = logits.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask / settings.tau
        return flush_tiny_(torch.softmax(logits, dim=-1))

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        attn = derived(ctx, lambda: SoftSDPA._softened(ctx))
        grad_v = attn.transpose(-2, -1).to(g.dtype) @ g
        value_shape = ctx.value_shape
        if len(value_shape) >= 3 and grad_v.shape[-3] != value_shape[-3]:
            groups = grad_v.shape[-3] // value_shape[-3]  # grouped-query attention: fold the repeats back
            grad_v = grad_v.unflatten(-3, (value_shape[-3], groups)).sum(-3)
        return None, None, _sum_to_shape(grad_v, value_shape), None, None


@dataclass(frozen=True, eq=False)
class WeightSettings:
    """How softmax weights meet their values in one product.

    ``form``: ``"left"`` for ``W @ V`` (W normalised over its last dim), ``"right"`` for ``V @ W``
    (W normalised over its second-last dim), ``"product"`` for the elementwise ``V * W``.
    """

    call: Callable[[Tensor, Tensor], Tensor]  # (weights, value) -> the original result
    form: str
    dim: int
    tau: float
    keep: bool


class SoftWeighted(torch.autograd.Function):
    """Softmax weights times values: forward unchanged, backward to the values only, through Ã."""

    @staticmethod
    def forward(ctx: Any, weights: Tensor, value: Tensor, settings: WeightSettings) -> Tensor:  # type: ignore[override]
        out = settings.call(weights, value)
        ctx.save_for_backward(weights)
        ctx.settings, ctx.value_shape, ctx.keep = settings, value.shape, settings.keep
        return out

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        settings: WeightSettings = ctx.settings
        softened = derived(ctx, lambda: soften(ctx.saved_tensors[0], settings.tau, settings.dim)).to(g.dtype)
        if settings.form == "left":
            grad = softened.transpose(-2, -1) @ g
        elif settings.form == "right":
            grad = g @ softened.transpose(-2, -1)
        else:
            grad = g * softened
        return None, _sum_to_shape(grad, ctx.value_shape), None


# --------------------------------------------------------------------------- bookkeeping


@dataclass(eq=False)
class _Use:
    """What became of one softmax's output during the forward (resolved when the forward ends)."""

    weighted: bool = False  # reached a value-transport product
    stray: str | None = None  # the first other torch function that consumed it

    def resolve(self, scope: Scope) -> None:
        # Weights that reached a value-transport product count as attention even when they are also
        # returned (``nn.MultiheadAttention(need_weights=True)`` reshapes and averages them for the caller).
        if self.weighted:
            scope.softened("attention", scope.rules.tau("attention"))
        elif self.stray is not None:
            scope.uncovered(f"softmax weights used by {self.stray}")
        else:
            scope.uncovered("softmax not used as attention weights")


@dataclass(frozen=True, eq=False)
class _Tag:
    """Rides on a softmax output (or a pass-through of it): its softmax dim, counted from the end."""

    version: int
    dim: int
    use: _Use


def _tag(t: Any, dim: int, use: _Use) -> None:
    if isinstance(t, Tensor):
        setattr(t, _TAG, _Tag(t._version, dim, use))


def tag_of(t: Any) -> _Tag | None:
    """The tag of an unmodified softmax output (or pass-through of one), else ``None``."""
    tag = getattr(t, _TAG, None) if isinstance(t, Tensor) else None
    return tag if tag is not None and tag.version == t._version else None


def _from_end(dim: int, ndim: int) -> int:
    return dim - ndim if dim >= 0 else dim


def _name(func: Any) -> str:
    """How a user would write the callable: ``Tensor.sum``, ``torch.einsum``, ``F.pad``."""
    qualname = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    qualname = qualname.replace("TensorBase.", "Tensor.").replace("_VariableFunctionsClass.", "torch.")
    if "." in qualname:
        return qualname
    module = getattr(func, "__module__", None) or ""
    return f"F.{qualname}" if module == "torch.nn.functional" else f"torch.{qualname}"


def _stray(tag: _Tag, func: Any) -> None:
    if tag.use.stray is None:
        tag.use.stray = _name(func)


def _softmax(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    use = _Use()
    scope.defer(use)
    dim = arg(args, kwargs, 1, "dim")
    if isinstance(out, Tensor) and isinstance(dim, int) and out.dim() > 0:
        _tag(out, _from_end(dim, out.dim()), use)
    return out


def _weighted(scope: Scope, weights: Tensor, value: Tensor, form: str, tag: _Tag, call: Callable) -> Any:
    """Run one weights-times-values product under the attention rule (or plainly when it is off)."""
    tag.use.weighted = True
    tau = scope.rules.tau("attention")
    if tau is None or not needs_soft(weights, value):
        return call(weights, value)
    settings = WeightSettings(call, form, tag.dim, float(tau), scope.rules.keep_derived)
    return SoftWeighted.apply(weights, value, settings)


def _matmul(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    a, b = args[0], (args[1] if len(args) > 1 else next(iter(kwargs.values()), None))
    ta, tb = tag_of(a), tag_of(b)
    if ta is None and tb is None:
        return func(*args, **kwargs)
    if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() >= 2 and b.dim() >= 2) or kwargs.get("out") is not None:
        for tag in (ta, tb):
            if tag is not None:
                _stray(tag, func)
        return func(*args, **kwargs)
    if ta is not None and ta.dim == -1 and tb is None:  # softmax(S) @ V: a weighted sum over the softmax dim
        return _weighted(scope, a, b, "left", ta, lambda w, v: func(w, v))
    if tb is not None and tb.dim == -2 and ta is None:  # V @ softmax(S)^T
        return _weighted(scope, b, a, "right", tb, lambda w, v: func(v, w))
    for tag in (ta, tb):  # a product that does not sum over the softmax dim, or two softmax operands
        if tag is not None:
            _stray(tag, func)
    return func(*args, **kwargs)


def _mul(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    a, b = args[0], (args[1] if len(args) > 1 else kwargs.get("other"))
    ta, tb = tag_of(a), tag_of(b)
    if ta is None and tb is None:
        return func(*args, **kwargs)
    plain_value = (b if tb is None else a if ta is None else None)
    if isinstance(plain_value, Tensor) and plain_value.is_floating_point() and len(args) + len(kwargs) == 2:
        weights, tag = (a, ta) if ta is not None else (b, tb)
        first = weights is a
        return _weighted(scope, weights, plain_value, "product", tag,
                         lambda w, v: func(w, v) if first else func(v, w))
    for tag in (ta, tb):  # scaled by a number, or two softmax operands
        if tag is not None:
            _stray(tag, func)
    return func(*args, **kwargs)


def _swapped(func: Any, args: tuple, kwargs: dict, ndim: int) -> list[int] | None:
    """The dim order a transpose-like call produces (``order[i]`` = source dim of output dim i)."""
    order = list(range(ndim))
    if func == _MT:
        order[-2], order[-1] = order[-1], order[-2]
        return order
    if func in (Tensor.permute, torch.permute):
        dims = args[1:] if len(args) > 1 else kwargs.get("dims", ())
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        return [int(d) % ndim for d in dims] if len(dims) == ndim else None
    i, j = arg(args, kwargs, 1, "dim0"), arg(args, kwargs, 2, "dim1")
    if not (isinstance(i, int) and isinstance(j, int)):
        return None
    order[i % ndim], order[j % ndim] = order[j % ndim], order[i % ndim]
    return order


def _reorder(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    """Transposes and permutes: the weights pass through, their softmax dim follows the dims."""
    out = func(*args, **kwargs)
    tag = tag_of(args[0])
    if tag is not None:
        ndim = args[0].dim()
        order = _swapped(func, args, kwargs, ndim)
        source = tag.dim % ndim
        if order is None or source not in order:
            _stray(tag, func)
        else:
            _tag(out, _from_end(order.index(source), ndim), tag.use)
    return out


def _pass_through(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    """Casts and copies: the same weights, the same dim."""
    out = func(*args, **kwargs)
    tag = tag_of(args[0])
    if tag is not None and out is not args[0]:
        if isinstance(out, Tensor) and out.shape == args[0].shape:
            _tag(out, tag.dim, tag.use)
        else:
            _stray(tag, func)
    return out


def _dropout(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    """Attention dropout: the identity in eval mode (or at p = 0); in training it rescales the weights."""
    out = func(*args, **kwargs)
    tag = tag_of(arg(args, kwargs, 0, "input"))
    if tag is not None and out is not args[0]:
        identity = not arg(args, kwargs, 2, "training", True) or float(arg(args, kwargs, 1, "p", 0.5)) == 0.0
        if identity:
            _tag(out, tag.dim, tag.use)
        else:
            _stray(tag, func)
    return out


#: Calls that read no values of a tensor (or cut its gradient): they do not consume softmax weights.
_HARMLESS = frozenset({
    Tensor.size, Tensor.dim, Tensor.numel, Tensor.__len__, Tensor.stride, Tensor.is_floating_point,
    Tensor.is_contiguous, Tensor.element_size, Tensor.data_ptr, Tensor.detach, torch.detach, Tensor.__repr__,
    Tensor.__format__, Tensor.requires_grad_, Tensor.is_complex, Tensor.nelement, Tensor.ndimension,
})


def _tensors_in(values: Any) -> Iterator[Any]:
    for value in values:
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


def watch(func: Any, args: tuple, kwargs: dict) -> None:
    """Note softmax weights that reach a torch function no attention handler understands.

    The engine calls this for every call while some softmax of the forward is unresolved.
    """
    if func in _AWARE or func in _HARMLESS or getattr(func, "__name__", None) == "__get__":  # attribute reads
        return
    for value in _tensors_in(args):
        tag = tag_of(value)
        if tag is not None:
            _stray(tag, func)
    for value in _tensors_in(kwargs.values()):
        tag = tag_of(value)
        if tag is not None:
            _stray(tag, func)


# --------------------------------------------------------------------------- whole attention calls


def _sdpa(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    q, k, v = (arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    tau = scope.rules.tau("attention")
    scope.softened("attention", tau)
    if tau is None or not needs_soft(q, k, v):
        return func(*args, **kwargs)
    mask = arg(args, kwargs, 3, "attn_mask")
    rest = args[3:]
    settings = SDPASettings(
        call=lambda a, b, c: func(a, b, c, *rest, **kwargs),
        is_causal=bool(arg(args, kwargs, 5, "is_causal", False)),
        scale=arg(args, kwargs, 6, "scale"),
        tau=float(tau),
        keep=scope.rules.keep_derived,
    )
    return SoftSDPA.apply(q, k, v, mask, settings)


def _with_inner_dispatch(fn: types.FunctionType) -> types.FunctionType:
    """A copy of a torch Python function that skips its own ``__torch_function__`` check.

    The original hands the whole call to the active mode (which is popped while
    it handles a call), so the ops inside it would never reach the rules. The
    copy runs the same body while the rules are active again, so they do.
    """
    namespace = dict(fn.__globals__, has_torch_function=lambda *_: False)
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


_MHA_BODY = _with_inner_dispatch(F.multi_head_attention_forward)


def _multi_head_attention(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    """nn.MultiheadAttention computes attention inside one functional call: run its body under the rules."""
    with scope.reentered():
        return _MHA_BODY(*args, **kwargs)


def _table() -> dict[Any, Handler]:
    table: dict[Any, Handler] = {F.scaled_dot_product_attention: _sdpa, F.multi_head_attention_forward: _multi_head_attention}
    softmaxes = (F.softmax, torch.softmax, Tensor.softmax, torch.special.softmax, F.softmin)
    groups: tuple[tuple[tuple[Any, ...], Handler], ...] = (
        (softmaxes, _softmax),
        ((torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm), _matmul),
        ((torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__), _mul),
        ((Tensor.transpose, torch.transpose, Tensor.swapaxes, torch.swapaxes, Tensor.swapdims, torch.swapdims,
          Tensor.permute, torch.permute, _MT), _reorder),
        ((Tensor.to, Tensor.type_as, Tensor.float, Tensor.half, Tensor.bfloat16, Tensor.double, Tensor.contiguous,
          Tensor.clone, torch.clone), _pass_through),
        ((F.dropout, torch.dropout), _dropout),
    )
    for funcs, handler in groups:
        table.update(dict.fromkeys(funcs, handler))
    return table


#: callable -> handler for attention.
HANDLERS: dict[Any, Handler] = _table()
#: Calls whose handlers decide themselves what softmax weights among their arguments mean.
_AWARE = frozenset(HANDLERS)
