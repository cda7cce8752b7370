"""Which torch callables each soft rule intercepts, and how.

The engine sees every torch function call made during a model's forward (a
``TorchFunctionMode``), so rules reach gated ops however they are written:
modules (which call these functions), functional calls inside a ``forward``,
Tensor methods and in-place variants. ``HANDLERS`` maps a callable to a
handler ``(mode, func, args, kwargs) -> result``; every handler computes its
result with the original callable, so forward values are bit-identical.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.nn import functional as F

from . import gates
from .attention import SoftAttentionValue, SoftSDPA, is_tagged_softmax, tag_softmax
from .norms import SoftGroupNorm, SoftLayerNorm
from .pooling import SoftMaxPool2d, pool_geometry
from .sources import Affine, Source, Stored, Sum, attach, detach_recipe, recipe_of, source_for

if TYPE_CHECKING:
    from ..mode import SoftBackwardMode

Handler = Callable[["SoftBackwardMode", Any, tuple, dict], Any]


class UncoveredGatedOpWarning(UserWarning):
    """A gated op ran with no soft rule: that part of the network uses the plain gradient."""


def _arg(args: Sequence[Any], kwargs: dict[str, Any], index: int, name: str, default: Any = None) -> Any:
    """Read an argument given by position or keyword."""
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def needs_soft(*tensors: Any) -> bool:
    """Whether a backward can reach this op (grad on and some input requires grad)."""
    return torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class _Activation:
    """How to read one activation callable: its rule, gate, parameters and in-place flag."""

    rule: str
    gate: gates.Gate
    params: tuple[str, ...] = ()  # positional parameters after the input
    fixed: dict[str, float] = field(default_factory=dict)  # parameters implied by the callable
    inplace: bool | None = None  # True/False: always; None: read the ``inplace`` argument

    def __call__(self, mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
        x = _arg(args, kwargs, 0, "input")
        tau = mode.rules.tau(self.rule)
        mode.record(self.rule, tau)
        if tau is None or not needs_soft(x):
            return func(*args, **kwargs)
        values = {name: _arg(args, kwargs, i + 1, name) for i, name in enumerate(self.params)}
        params = {k: v for k, v in values.items() if v is not None} | self.fixed
        inplace = self.inplace if self.inplace is not None else bool(_arg(args, kwargs, len(self.params) + 1, "inplace"))
        source = source_for(x)
        early = inplace and isinstance(source, Stored)  # x will be overwritten: derive the gate now
        rest = args[1:]

        def call(t: Tensor) -> Tensor:
            return func(t, *rest, **kwargs)

        keep = mode.rules.keep_derived
        scales, terms = _direct_terms(source)
        out = gates.SoftElementwise.apply(
            x, call, self.gate, tau, params, source, inplace, keep, early, scales, *terms
        )
        if inplace:
            detach_recipe(x)
        return out


def _direct_terms(source: Source) -> tuple[tuple[Tensor | None, ...] | None, tuple[Tensor, ...]]:
    """Scales and tensors of the terms x's cotangent goes straight to, when x came from frozen eval
    BatchNorms (see ``SoftElementwise``); ``(None, ())`` when it goes to x itself."""
    if isinstance(source, Stored) or not source.direct():
        return None, ()
    terms = source.terms()
    return tuple(scale for _, scale, _ in terms), tuple(t for t, _, _ in terms)


def _activation_table() -> dict[Any, Handler]:
    relu = _Activation("relu", gates.relu_gate, inplace=False)
    relu_inplace = _Activation("relu", gates.relu_gate, inplace=True)
    leaky = _Activation("leaky_relu", gates.leaky_relu_gate, ("negative_slope",))
    leaky_inplace = _Activation("leaky_relu", gates.leaky_relu_gate, ("negative_slope",), inplace=True)
    hardtanh = _Activation("hardtanh", gates.hardtanh_gate, ("min_val", "max_val"))
    hardtanh_inplace = _Activation("hardtanh", gates.hardtanh_gate, ("min_val", "max_val"), inplace=True)
    relu6 = _Activation("hardtanh", gates.hardtanh_gate, fixed={"min_val": 0.0, "max_val": 6.0})
    elu = _Activation("elu", gates.elu_gate, ("alpha",))
    elu_inplace = _Activation("elu", gates.elu_gate, ("alpha",), inplace=True)
    return {
        F.relu: _Activation("relu", gates.relu_gate),
        torch.relu: relu,
        Tensor.relu: relu,
        torch.relu_: relu_inplace,
        Tensor.relu_: relu_inplace,
        F.leaky_relu: leaky,
        F.leaky_relu_: leaky_inplace,
        F.hardtanh: hardtanh,
        F.hardtanh_: hardtanh_inplace,
        F.relu6: relu6,
        F.elu: elu,
        F.elu_: elu_inplace,
        F.gelu: _Activation("gelu", gates.relu_gate, ("approximate",), inplace=False),
        F.silu: _Activation("silu", gates.silu_gate),
        F.mish: _Activation("mish", gates.mish_gate),
        F.hardswish: _Activation("hardswish", gates.hardswish_gate),
        F.hardsigmoid: _Activation("hardsigmoid", gates.hardsigmoid_gate),
    }


# --------------------------------------------------------------------------- pooling and norms


def _max_pool2d(mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
    x = _arg(args, kwargs, 0, "input")
    tau = mode.rules.tau("maxpool")
    mode.record("maxpool", tau)
    if tau is None or not needs_soft(x):
        return func(*args, **kwargs)
    geometry = pool_geometry(
        _arg(args, kwargs, 1, "kernel_size"),
        _arg(args, kwargs, 2, "stride"),
        _arg(args, kwargs, 3, "padding", 0),
        _arg(args, kwargs, 4, "dilation", 1),
    )
    rest = args[1:]
    return SoftMaxPool2d.apply(
        x, lambda t: func(t, *rest, **kwargs), geometry, tau, mode.rules.maxpool_padding, mode.rules.keep_derived
    )


def _params(mode: "SoftBackwardMode", *params: Tensor | None) -> tuple[Tensor | None, ...]:
    """The norm's parameters as the rule should see them (detached when no parameter gradient is wanted)."""
    if mode.rules.param_grads:
        return params
    return tuple(None if p is None else p.detach() for p in params)


def _layer_norm(mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    on = mode.rules.tau("layernorm")
    mode.record("layernorm", on)
    if on is None or not needs_soft(x, weight, bias):
        return func(*args, **kwargs)
    eps = float(_arg(args, kwargs, 4, "eps", 1e-5))
    dims = 1 if isinstance(shape, int) else len(shape)
    rest = args[1:]
    weight, bias = _params(mode, weight, bias)
    return SoftLayerNorm.apply(x, lambda t: func(t, *rest, **kwargs), weight, bias, dims, eps, False)


def _rms_norm(mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
    x, shape = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "normalized_shape")
    weight = _arg(args, kwargs, 2, "weight")
    on = mode.rules.tau("rmsnorm")
    mode.record("rmsnorm", on)
    if on is None or not needs_soft(x, weight):
        return func(*args, **kwargs)
    eps = _arg(args, kwargs, 3, "eps")
    eps = torch.finfo(x.dtype).eps if eps is None else float(eps)
    dims = 1 if isinstance(shape, int) else len(shape)
    rest = args[1:]
    (weight,) = _params(mode, weight)
    return SoftLayerNorm.apply(x, lambda t: func(t, *rest, **kwargs), weight, None, dims, eps, True)


def _group_norm(mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
    x, groups = _arg(args, kwargs, 0, "input"), int(_arg(args, kwargs, 1, "num_groups"))
    weight, bias = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
    on = mode.rules.tau("groupnorm")
    mode.record("groupnorm", on)
    if on is None or not needs_soft(x, weight, bias):
        return func(*args, **kwargs)
    eps = float(_arg(args, kwargs, 4, "eps", 1e-5))
    rest = args[1:]
    weight, bias = _params(mode, weight, bias)
    return SoftGroupNorm.apply(x, lambda t: func(t, *rest, **kwargs), weight, bias, groups, eps)


# --------------------------------------------------------------------------- attention


def _sdpa(mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
    q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    tau = mode.rules.tau("attention")
    mode.record("attention", tau)
    if tau is None or not needs_soft(q, k, v):
        return func(*args, **kwargs)
    mask = _arg(args, kwargs, 3, "attn_mask")
    is_causal = bool(_arg(args, kwargs, 5, "is_causal", False))
    scale = _arg(args, kwargs, 6, "scale")
    rest = args[3:]
    return SoftSDPA.apply(
        q, k, v, lambda a, b, c: func(a, b, c, *rest, **kwargs), mask, is_causal, scale, tau, mode.rules.keep_derived
    )


def _softmax(mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
    out = func(*args, **kwargs)
    dim = _arg(args, kwargs, 1, "dim")
    if dim is not None and mode.rules.tau("attention") is not None and isinstance(out, Tensor) and out.requires_grad:
        tag_softmax(out, int(dim))
    return out


def _matmul(mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
    attn, value = args[0], (args[1] if len(args) > 1 else next(iter(kwargs.values()), None))
    if not is_tagged_softmax(attn) or not isinstance(value, Tensor):
        return func(*args, **kwargs)
    tau = mode.rules.tau("attention")
    mode.record("attention", tau)
    if tau is None or not needs_soft(attn, value):
        return func(*args, **kwargs)
    return SoftAttentionValue.apply(attn, value, lambda a, b: func(a, b), tau, mode.rules.keep_derived)


def _einsum(mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
    operands = [t for a in args[1:] for t in (a if isinstance(a, (list, tuple)) else (a,))]
    if any(is_tagged_softmax(t) for t in operands):
        mode.uncovered("attention through torch.einsum")
    return func(*args, **kwargs)


def _with_inner_dispatch(fn: types.FunctionType) -> types.FunctionType:
    """A copy of a torch Python function that skips its own ``__torch_function__`` check.

    The original hands the whole call to the active mode (which is popped while
    it handles a call), so the ops inside it would never reach the rules. The
    copy runs the same body while the mode is active, so they do.
    """
    namespace = dict(fn.__globals__, has_torch_function=lambda *_: False)
    copy = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


_MHA_BODY = _with_inner_dispatch(F.multi_head_attention_forward)


def _multi_head_attention(mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
    """nn.MultiheadAttention computes attention inside one functional call: run its body under the mode."""
    with mode:
        return _MHA_BODY(*args, **kwargs)


# --------------------------------------------------------------------------- recipes (memory)


def _batch_statistics(out: Tensor) -> tuple[Tensor, Tensor] | None:
    """(mean, 1 / std) a train-mode BatchNorm normalised with, read from the autograd node that
    saved them for its own backward; ``None`` for other kernels (cuDNN, MIOpen) that name them
    differently."""
    node = out.grad_fn
    if type(node).__name__ != "NativeBatchNormBackward0":
        return None
    return node._saved_result1, node._saved_result2


def _batch_norm(mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
    """BatchNorm: tag the output with its affine recipe (see ``sources``).

    Eval mode normalises with the running statistics, so cotangents may skip the BatchNorm when its
    parameters want no gradient. Train mode normalises with the batch's own statistics, so the
    recipe serves only to recompute x."""
    out = func(*args, **kwargs)
    x = _arg(args, kwargs, 0, "input")
    if not needs_soft(x):
        return out
    training = bool(_arg(args, kwargs, 5, "training", False))
    weight, bias = _arg(args, kwargs, 3, "weight"), _arg(args, kwargs, 4, "bias")
    with torch.no_grad():
        if training:
            stats = _batch_statistics(out)
            if stats is None:
                return out
            mean, invstd = stats
        else:
            mean, var = _arg(args, kwargs, 1, "running_mean"), _arg(args, kwargs, 2, "running_var")
            invstd = torch.rsqrt(var + float(_arg(args, kwargs, 7, "eps", 1e-5)))
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        view = (1, -1) + (1,) * (x.dim() - 2)
        scale, shift = scale.reshape(view).to(x.dtype), shift.reshape(view).to(x.dtype)
    wanted = mode.rules.param_grads and any(p is not None and p.requires_grad for p in (weight, bias))
    attach(out, Affine(x, x._version, scale, shift, skippable=not (training or wanted)))
    return out


def _add(mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
    """``a + b`` where ``a`` or ``b`` has a recipe (a residual after BatchNorm): keep a recipe for the sum."""
    a, b = args[0], (args[1] if len(args) > 1 else kwargs.get("other"))
    inplace = func is Tensor.add_
    if kwargs.get("alpha", 1) != 1 or not isinstance(b, Tensor) or not isinstance(a, Tensor) or a.shape != b.shape:
        return func(*args, **kwargs)
    ra, rb = recipe_of(a), recipe_of(b)
    if (ra is None and rb is None) or (inplace and ra is None) or not needs_soft(a, b):
        return func(*args, **kwargs)
    recipe = Sum(ra or Stored.of(a), rb or Stored.of(b))
    out = func(*args, **kwargs)
    attach(out, recipe)
    return out


# --------------------------------------------------------------------------- gated ops without a rule

#: Gated ops we have no soft rule for: they run with their plain backward, and the
#: coverage report (and a warning) says so.
_UNCOVERED: dict[Any, str] = {
    F.prelu: "prelu",
    torch.prelu: "prelu",
    F.rrelu: "rrelu",
    F.rrelu_: "rrelu",
    F.celu: "celu",
    F.celu_: "celu",
    F.selu: "selu",
    F.selu_: "selu",
    torch.selu: "selu",
    F.threshold: "threshold",
    F.threshold_: "threshold",
    F.hardshrink: "hardshrink",
    F.softshrink: "softshrink",
    F.max_pool1d: "max_pool1d",
    F.max_pool3d: "max_pool3d",
    F.adaptive_max_pool1d: "adaptive_max_pool1d",
    F.adaptive_max_pool2d: "adaptive_max_pool2d",
    F.adaptive_max_pool3d: "adaptive_max_pool3d",
    F.fractional_max_pool2d: "fractional_max_pool2d",
    F.fractional_max_pool3d: "fractional_max_pool3d",
    F.instance_norm: "instance_norm",
    F.local_response_norm: "local_response_norm",
}


def _uncovered(name: str) -> Handler:
    def handler(mode: "SoftBackwardMode", func: Any, args: tuple, kwargs: dict) -> Any:
        if needs_soft(*args):
            mode.uncovered(name)
        return func(*args, **kwargs)

    return handler


def warn_uncovered(name: str) -> None:
    """Tell the user once per op that part of the network gets the plain gradient."""
    warnings.warn(
        f"sp_lightning: gated op {name!r} ran with no soft rule; its backward is the plain gradient. "
        "See sp_lightning.coverage_report(model, inputs) for the full list.",
        UncoveredGatedOpWarning,
        stacklevel=2,
    )


def _build() -> dict[Any, Handler]:
    table: dict[Any, Handler] = _activation_table()
    for func in (F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d):
        table[func] = _max_pool2d
    table.update({F.layer_norm: _layer_norm, torch.layer_norm: _layer_norm, F.group_norm: _group_norm})
    if hasattr(F, "rms_norm"):
        table[F.rms_norm] = _rms_norm
    table[F.scaled_dot_product_attention] = _sdpa
    for func in (F.softmax, torch.softmax, Tensor.softmax):
        table[func] = _softmax
    for func in (torch.matmul, Tensor.matmul, Tensor.__matmul__, torch.bmm, Tensor.bmm):
        table[func] = _matmul
    table[torch.einsum] = _einsum
    table[F.multi_head_attention_forward] = _multi_head_attention
    table[F.batch_norm] = _batch_norm
    for func in (Tensor.add, Tensor.add_, torch.add):
        table[func] = _add
    for func, name in _UNCOVERED.items():
        table.setdefault(func, _uncovered(name))
    return table


#: callable -> handler, built once.
HANDLERS: dict[Any, Handler] = _build()
