"""Explainers from elsewhere in the project's call shape: any ``(model, inputs, target)`` callable, or a Captum ``Attribution``.

:func:`as_explainer` wraps one so that the callback, the metrics and ``sp-lightning evaluate``
treat it like :class:`~sp_lightning.explainers.Gradient`: ``attribute(inputs, target)`` with
the same targets, run in eval mode with every submodule's mode, the RNG and ``.grad``
restored (the explainers' session). Whatever the wrapped explainer returns is fitted to the
inputs' shape: one channel ``(B, H, W)`` / ``(B, 1, H, W)`` is repeated over the channels
and a coarser map (e.g. Grad-CAM at a layer's resolution) is upsampled bilinearly first.

Captum stays optional: it is imported only to recognise an object whose class comes from
it. Build a Captum attribution on the model that is explained (``IntegratedGradients(model)``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import SoftRules
from .base import Explainer

#: ``(model, inputs, target) -> attribution``: ``target`` is a LongTensor (B,).
ExplainFn = Callable[[nn.Module, Tensor, Tensor], Tensor]


def is_captum_attribution(obj: Any) -> bool:
    """Whether ``obj`` is a Captum ``Attribution`` (Captum is imported only when its class comes from Captum)."""
    if not any(cls.__module__.split(".")[0] == "captum" for cls in type(obj).__mro__):
        return False
    from captum.attr import Attribution

    return isinstance(obj, Attribution)


class ExternalExplainer(Explainer):
    """An explainer made of a ``(model, inputs, target)`` callable or a Captum ``Attribution``.

    Args:
        model: the model explained (passed to the callable; a Captum attribution must be built on it).
        explain: the callable or the Captum attribution.
        name: shown in error messages (default: the class or function name).
        **options: extra keyword arguments for a Captum attribution's ``attribute`` (e.g. ``n_steps=16``).
    """

    def __init__(self, model: nn.Module, explain: ExplainFn | Any, name: str | None = None, **options: Any) -> None:
        super().__init__(model, SoftRules.hard())
        self.captum = is_captum_attribution(explain)
        if not self.captum and not callable(explain):
            raise TypeError(
                f"An explainer must be a callable (model, inputs, target) -> attribution or a Captum Attribution, "
                f"got {type(explain).__name__}."
            )
        if options and not self.captum:
            raise TypeError(f"Options {sorted(options)} are for a Captum attribution's attribute(); got a callable.")
        self.explain, self.options = explain, dict(options)
        self.name = name or getattr(explain, "__name__", type(explain).__name__)

    def _attribute(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """One call per target column; each result fitted to the inputs' shape."""
        return torch.stack([self._one(inputs, targets[:, t]) for t in range(targets.shape[1])], dim=1)

    def _one(self, inputs: Tensor, target: Tensor) -> Tensor:
        if self.captum:
            result = self.explain.attribute(inputs, target=target, **self.options)
        else:
            result = self.explain(self.model, inputs, target)
        return fit_to_inputs(result, inputs, self.name)


def fit_to_inputs(result: Any, inputs: Tensor, name: str = "explainer") -> Tensor:
    """``result`` as a detached tensor shaped like ``inputs`` (B, C, H, W): channels repeated, coarse maps upsampled.

    Example:
        >>> fit_to_inputs(torch.ones(2, 1, 4, 4), torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 3, 8, 8])
    """
    if isinstance(result, tuple) and len(result) == 1:  # Captum returns a tuple for tuple inputs
        result = result[0]
    if not isinstance(result, Tensor) or not result.is_floating_point():
        raise TypeError(f"{name} must return a floating-point tensor, got {type(result).__name__}.")
    result = result.detach().to(inputs.dtype)
    if result.dim() == inputs.dim() - 1:
        result = result.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
    if result.dim() == 4 and inputs.dim() == 4 and result.shape[0] == inputs.shape[0]:
        if result.shape[2:] != inputs.shape[2:]:
            result = F.interpolate(result, size=inputs.shape[2:], mode="bilinear", align_corners=False)
    try:
        return result.expand(inputs.shape).clone()
    except RuntimeError:
        raise ValueError(
            f"{name} returned an attribution of shape {tuple(result.shape)}, which does not fit inputs of shape "
            f"{tuple(inputs.shape)}: return the inputs' shape, one channel (B, 1, H, W) or (B, H, W), or a coarser "
            "(B, 1, h, w) map to be upsampled."
        ) from None


def as_explainer(explain: Explainer | ExplainFn | Any, model: nn.Module, name: str | None = None) -> Explainer:
    """``explain`` as a project :class:`Explainer` on ``model``: returned as is when it already is one.

    Args:
        explain: an :class:`Explainer` on ``model``, a ``(model, inputs, target)`` callable, or a Captum
            ``Attribution`` built on ``model``.
        model: the model to explain.
        name: used in error messages.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> ones = as_explainer(lambda m, x, t: torch.ones_like(x), model)
        >>> ones.attribute(torch.rand(2, 3, 2, 2), target=1).shape
        torch.Size([2, 3, 2, 2])
    """
    if isinstance(explain, Explainer):
        if explain.model is not model:
            raise ValueError(f"{name or type(explain).__name__} explains a different model; build it on this model.")
        return explain
    return ExternalExplainer(model, explain, name)
