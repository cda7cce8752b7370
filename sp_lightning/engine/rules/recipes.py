"""How a soft rule gets its pre-activation back in the backward pass: recipes, and the handlers that leave them.

A plain ReLU saves its *output*, which the next layer saves anyway, so it costs
no memory. A soft ReLU needs its *input* x. Saving x is one extra activation per
ReLU (the main cost of naive implementations). When x was produced by an
eval-mode BatchNorm (optionally plus a residual), x is an affine function of
tensors autograd already keeps: we save that recipe instead of x and recompute
x in the backward with one fused elementwise op.

Recipes ride on the tensor they describe (attribute ``_sp_source`` with the
tensor's version); any in-place change of the tensor invalidates them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from .interface import Handler, Scope, arg, needs_soft

_ATTR = "_sp_source"

#: One summand of a recomputed input: ``(tensor, scale, shift)``; scale and shift are both ``None``
#: (the tensor itself) or both per-channel tensors.
Term = tuple[Tensor, Tensor | None, Tensor | None]


def _check_version(t: Tensor, version: int) -> None:
    if t._version != version:
        raise RuntimeError(
            "sp_lightning: a tensor saved for a soft backward rule was modified in place after the "
            "forward pass; run the backward before changing activations in place."
        )


class Source(ABC):
    """Something that can return a gated op's input (times a factor) in the backward."""

    @abstractmethod
    def scaled(self, factor: float) -> Tensor:
        """Return ``factor * x`` as a fresh tensor the caller may overwrite."""

    @abstractmethod
    def value(self) -> Tensor:
        """Return ``x`` (may alias a saved tensor: do not modify it)."""

    @abstractmethod
    def terms(self) -> tuple[Term, ...]:
        """``x`` as a sum of ``tensor * scale + shift`` terms (scale, shift ``None``: the tensor itself)."""

    @abstractmethod
    def direct(self) -> bool:
        """Whether x's cotangent may skip the ops that made x and go straight to the terms' tensors:
        true unless some affine's parameters want a gradient of their own."""


@dataclass(eq=False)
class Stored(Source):
    """x itself, saved (with its version, to catch later in-place edits)."""

    tensor: Tensor
    version: int

    @classmethod
    def of(cls, t: Tensor) -> "Stored":
        return cls(t, t._version)

    def value(self) -> Tensor:
        _check_version(self.tensor, self.version)
        return self.tensor

    def scaled(self, factor: float) -> Tensor:
        return self.value() * factor

    def terms(self) -> tuple[Term, ...]:
        return ((self.value(), None, None),)

    def direct(self) -> bool:
        return True


@dataclass(eq=False)
class Affine(Source):
    """x = src * scale + shift (per-channel), e.g. a BatchNorm.

    ``skippable``: scale and shift are constants whose origin wants no gradient (an eval-mode
    BatchNorm with frozen parameters), so x's cotangent may go straight to src.
    """

    src: Tensor
    version: int
    scale: Tensor
    shift: Tensor
    skippable: bool

    def value(self) -> Tensor:
        return self.scaled(1.0)

    def scaled(self, factor: float) -> Tensor:
        _check_version(self.src, self.version)
        return torch.addcmul(self.shift * factor, self.src, self.scale * factor)

    def terms(self) -> tuple[Term, ...]:
        _check_version(self.src, self.version)
        return ((self.src, self.scale, self.shift),)

    def direct(self) -> bool:
        return self.skippable


@dataclass(eq=False)
class Sum(Source):
    """x = a + b, e.g. a BatchNorm output plus a residual."""

    a: Source
    b: Source

    def value(self) -> Tensor:
        return self.scaled(1.0)

    def scaled(self, factor: float) -> Tensor:
        return scaled_sum(self.terms(), factor)

    def terms(self) -> tuple[Term, ...]:
        return self.a.terms() + self.b.terms()

    def direct(self) -> bool:
        return self.a.direct() and self.b.direct()


def scaled_sum(terms: tuple[Term, ...], factor: float) -> Tensor:
    """``factor * x`` for x = the sum of ``terms``, in one pass per term: the shifts are summed first
    (per-channel, cheap), a plain tensor is added with ``alpha=factor``, a scaled one by ``addcmul_``."""
    shifts = [shift for _, scale, shift in terms if scale is not None]
    shift = sum(shifts[1:], shifts[0]) * factor if shifts else None
    out: Tensor | None = None
    for t, scale, _ in terms:
        if out is None:
            if scale is not None:  # then ``shift`` is set
                out = torch.addcmul(shift, t, scale * factor)
            else:
                out = t * factor if shift is None else torch.add(shift, t, alpha=factor)
        elif scale is None:
            out.add_(t, alpha=factor)
        else:
            out.addcmul_(t, scale * factor)
    assert out is not None
    return out


def attach(t: Tensor, source: Source) -> None:
    """Record that ``t`` can be recomputed from ``source`` (until ``t`` changes in place)."""
    setattr(t, _ATTR, (t._version, source))


def recipe_of(t: Tensor) -> Source | None:
    """The still-valid recipe attached to ``t``, if any."""
    entry = getattr(t, _ATTR, None)
    if entry is None or entry[0] != t._version:
        return None
    return entry[1]


def detach_recipe(t: Tensor) -> None:
    """Forget ``t``'s recipe (it is about to be overwritten)."""
    if hasattr(t, _ATTR):
        delattr(t, _ATTR)


def source_for(t: Tensor) -> Source:
    """Cheapest way to get ``t`` back later: its recipe, else ``t`` itself."""
    recipe = recipe_of(t)
    return recipe if recipe is not None else Stored.of(t)


# --------------------------------------------------------------------------- handlers


def _batch_statistics(out: Tensor) -> tuple[Tensor, Tensor] | None:
    """(mean, 1 / std) a train-mode BatchNorm normalised with, read from the autograd node that
    saved them for its own backward; ``None`` for other kernels (cuDNN, MIOpen) that name them
    differently."""
    node = out.grad_fn
    if type(node).__name__ != "NativeBatchNormBackward0":
        return None
    return node._saved_result1, node._saved_result2


def _batch_norm(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
    """BatchNorm: tag the output with its affine recipe.

    Eval mode normalises with the running statistics, so cotangents may skip the BatchNorm when its
    parameters want no gradient. Train mode normalises with the batch's own statistics, so the
    recipe serves only to recompute x."""
    out = func(*args, **kwargs)
    x = arg(args, kwargs, 0, "input")
    if not needs_soft(x):
        return out
    training = bool(arg(args, kwargs, 5, "training", False))
    weight, bias = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    with torch.no_grad():
        if training:
            stats = _batch_statistics(out)
            if stats is None:
                return out
            mean, invstd = stats
        else:
            mean, var = arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
            invstd = torch.rsqrt(var + float(arg(args, kwargs, 7, "eps", 1e-5)))
        scale = invstd if weight is None else invstd * weight
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias
        view = (1, -1) + (1,) * (x.dim() - 2)
        scale, shift = scale.reshape(view).to(x.dtype), shift.reshape(view).to(x.dtype)
    wanted = scope.rules.param_grads and any(p is not None and p.requires_grad for p in (weight, bias))
    attach(out, Affine(x, x._version, scale, shift, skippable=not (training or wanted)))
    return out


def _add(scope: Scope, func: Any, args: tuple, kwargs: dict) -> Any:
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


#: callable -> handler for the ops that leave recipes (memory, not rules: they change no gradient).
HANDLERS: dict[Any, Handler] = {F.batch_norm: _batch_norm, Tensor.add: _add, Tensor.add_: _add, torch.add: _add}
