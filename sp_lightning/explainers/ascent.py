"""Pullback Ascent: iterate normalised soft pullbacks to build a counterfactual (docs/method.md section 3).

x_0 = x; x_{k+1} = x_k + alpha * g_k / max(||g_k||_2, 1e-20) per sample, optionally
projected onto the L2 ball of radius ``eps`` around x_0 and clipped to the valid
input range (``clip="every"`` step or only the ``"last"``). The attribution is
x_K - x_0; the counterfactual image is x_K. With hard rules this is Gradient Ascent.

``alpha`` is in input units for the whole input: the paper's 20 suits
3x224x224 inputs in [-1, 1] (a per-element RMS step of about 0.052). For other
sizes or ranges use :func:`equivalent_alpha` to keep that per-element step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, nn

from ..engine import SoftRules
from .base import Explainer, LogitsFn, TargetLike, warn_if_not_finite

Clip = Literal["every", "last"] | None
Bound = float | Sequence[float] | Tensor
_REFERENCE_NUMEL = 3 * 224 * 224


def equivalent_alpha(sample_shape: Sequence[int], range_width: float = 2.0, alpha: float = 20.0) -> float:
    """The step that gives the paper's per-element RMS step on inputs of another size or range."""
    numel = math.prod(int(s) for s in sample_shape)
    return alpha * math.sqrt(numel / _REFERENCE_NUMEL) * range_width / 2.0


class AscentResult(NamedTuple):
    """Both outputs of one ascent run."""

    attribution: Tensor  # x_K - x_0
    counterfactual: Tensor  # x_K


def _as_bound(value: Bound, like: Tensor) -> Tensor:
    """A bound broadcastable to one sample: a number, or one value per channel (dim 1)."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        return t
    if t.dim() == 1 and like.dim() >= 2 and t.numel() == like.shape[1]:
        return t.reshape(-1, *([1] * (like.dim() - 2)))
    raise ValueError(
        f"bounds must be numbers or one value per channel ({like.shape[1] if like.dim() > 1 else 1} values), "
        f"got shape {tuple(t.shape)}."
    )


class PullbackAscent(Explainer):
    """Pullback Ascent (soft rules) with optional L2 ball and clipping.

    Args:
        alpha: step length per iteration (see module docstring for its scale).
        steps: number of iterations K.
        eps: radius of the L2 ball around the input, or ``None`` for none.
        clip: ``None``, ``"every"`` (each step) or ``"last"``; needs ``bounds``.
        bounds: ``(low, high)`` valid input range, numbers or per-channel sequences.
    """

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 20.0,
        steps: int = 5,
        eps: float | None = None,
        clip: Clip = None,
        bounds: tuple[Bound, Bound] | None = None,
        temperatures: Mapping[str, Any] | SoftRules | None = None,
        logits_fn: LogitsFn | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, SoftRules.coerce(temperatures, **options), logits_fn)
        if not alpha > 0 or int(steps) < 1:
            raise ValueError(f"alpha must be > 0 and steps >= 1, got alpha={alpha}, steps={steps}.")
        if eps is not None and not eps > 0:
            raise ValueError(f"eps must be > 0 or None (no ball), got {eps}.")
        if clip not in (None, "every", "last"):
            raise ValueError(f"clip must be None, 'every' or 'last', got {clip!r}.")
        if clip is not None and bounds is None:
            raise ValueError("clip needs bounds=(low, high): the valid input range (numbers or per-channel values).")
        if bounds is not None and (not isinstance(bounds, (tuple, list)) or len(bounds) != 2):
            raise ValueError("bounds must be a pair (low, high).")
        self.alpha, self.steps, self.eps, self.clip, self.bounds = float(alpha), int(steps), eps, clip, bounds

    def ascend(self, inputs: Tensor, target: TargetLike, first: Tensor | None = None) -> AscentResult:
        """Run the ascent once; returns the attribution and the counterfactual (shaped like ``attribute``).

        ``first``: the pullback at ``inputs`` toward ``target`` with this explainer's rules, when the
        caller already has it (shaped like ``attribute``'s output, e.g. from :class:`SoftPullback`
        with the same temperatures); the first step then reuses it instead of recomputing it.
        """
        with self._session():
            targets, single = self._targets(inputs, target)
            if first is not None:
                first = self._check_first(first, inputs, targets, single)
            delta, final = self._ascend(inputs.detach().clone(), targets, first)
        warn_if_not_finite(delta, "attributions")
        if single:
            delta, final = delta[:, 0], final[:, 0]
        return AscentResult(delta, final)

    def counterfactual(self, inputs: Tensor, target: TargetLike) -> Tensor:
        """The counterfactual images x_K."""
        return self.ascend(inputs, target).counterfactual

    def _attribute(self, inputs: Tensor, targets: Tensor) -> Tensor:
        return self._ascend(inputs, targets)[0]

    @staticmethod
    def _check_first(first: Tensor, inputs: Tensor, targets: Tensor, single: bool) -> Tensor:
        """``first`` as a detached (B, T, ...) tensor, or a clear error when its shape does not fit."""
        expected = (targets.shape[0],) + (() if single else (targets.shape[1],)) + tuple(inputs.shape[1:])
        if not isinstance(first, Tensor) or tuple(first.shape) != expected:
            shape = tuple(first.shape) if isinstance(first, Tensor) else type(first).__name__
            raise ValueError(f"first must be the pullback toward target, shaped {expected}; got {shape}.")
        first = first.detach().to(dtype=inputs.dtype, device=inputs.device)
        return first.unsqueeze(1) if single else first

    def _ascend(self, inputs: Tensor, targets: Tensor, first: Tensor | None = None) -> tuple[Tensor, Tensor]:
        batch, count = targets.shape
        sample_shape = inputs.shape[1:]
        low, high = (_as_bound(b, inputs) for b in self.bounds) if self.bounds is not None else (None, None)
        start = inputs.unsqueeze(1).expand(batch, count, *sample_shape).reshape(batch * count, *sample_shape)
        flat_targets = targets.reshape(-1, 1)
        x = start
        for step in range(self.steps):
            if step == 0:  # the first pullback is shared by all T targets of an input
                grad = self.pullback(inputs, targets) if first is None else first
                grad = grad.reshape(batch * count, *sample_shape)
            else:
                grad = self.pullback(x, flat_targets)[:, 0]
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-20).view(-1, *([1] * len(sample_shape)))
            x = x + self.alpha * grad / norm
            if self.eps is not None:
                delta = x - start
                length = delta.flatten(1).norm(dim=1).clamp_min(1e-20).view_as(norm)
                x = start + delta * torch.clamp(self.eps / length, max=1.0)
            if self.clip == "every" or (self.clip == "last" and step == self.steps - 1):
                x = torch.maximum(torch.minimum(x, high), low)
        final = x.reshape(batch, count, *sample_shape).detach()
        return final - inputs.unsqueeze(1), final


class GradientAscent(PullbackAscent):
    """Gradient Ascent: the same loop with hard rules (the counterfactual baseline)."""

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 20.0,
        steps: int = 5,
        eps: float | None = None,
        clip: Clip = None,
        bounds: tuple[Bound, Bound] | None = None,
        logits_fn: LogitsFn | None = None,
    ) -> None:
        super().__init__(model, alpha, steps, eps, clip, bounds, SoftRules.hard(), logits_fn)
