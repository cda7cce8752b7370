"""The explainers ``sp-lightning evaluate`` compares: the paper's rows, with its settings moved to these inputs.

Gradient, Soft Pullback, Pullback Ascent (unclipped, as the paper reports it) and SmoothGrad
always; Integrated Gradients and Guided Grad-CAM through Captum when it is installed (the
``captum`` extra). Settings that live in input units follow the inputs' range: the paper's
inputs span [-1, 1] (width 2), so SmoothGrad's noise is ``0.15 * width / 2`` and the ascent
step keeps the paper's per-element step (:func:`~sp_lightning.explainers.equivalent_alpha`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

from torch import nn

from ..engine import LogitsFn
from ..explainers import (
    Explainer, ExternalExplainer, Gradient, PullbackAscent, SmoothGrad, SoftPullback, equivalent_alpha,
)

#: Rows that need Captum.
CAPTUM_ROWS = ("IntegratedGradients", "GuidedGradCam")


def captum_installed() -> bool:
    """Whether Captum can be imported (without importing it)."""
    return importlib.util.find_spec("captum") is not None


def last_conv(model: nn.Module) -> nn.Conv2d | None:
    """The model's last ``nn.Conv2d`` in registration order (Grad-CAM's usual layer), or ``None``."""
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    return convs[-1] if convs else None


def default_explainers(
    model: nn.Module,
    sample_shape: Sequence[int],
    range_width: float,
    fast: bool = False,
    logits_fn: LogitsFn | None = None,
) -> tuple[dict[str, Explainer], list[str]]:
    """The rows to score, by name, and a note for each row left out (and why).

    Args:
        model: the classifier, in the state it is evaluated in.
        sample_shape: one input's shape (C, H, W), for the ascent's step length.
        range_width: width of the valid input range (high - low), for the noise and step scales.
        fast: SmoothGrad with 10 draws instead of 50, Integrated Gradients with 16 steps instead of 50.
        logits_fn: maps the model output to logits (the project's explainers only; Captum reads the output).
    """
    rows: dict[str, Explainer] = {
        "Gradient": Gradient(model, logits_fn),
        "SoftPullback": SoftPullback(model, logits_fn=logits_fn),
        "PullbackAscent": PullbackAscent(model, equivalent_alpha(sample_shape, range_width), 5, logits_fn=logits_fn),
        "SmoothGrad": SmoothGrad(model, n=10 if fast else 50, sigma=0.15 * range_width / 2.0, logits_fn=logits_fn),
    }
    if not captum_installed():
        return rows, [f"{', '.join(CAPTUM_ROWS)}: left out, Captum is not installed (pip install 'sp-lightning[captum]')."]
    from captum.attr import GuidedGradCam, IntegratedGradients

    notes = []
    rows["IntegratedGradients"] = ExternalExplainer(
        model, IntegratedGradients(model), "IntegratedGradients", n_steps=16 if fast else 50
    )
    layer = last_conv(model)
    if layer is None:
        notes.append("GuidedGradCam: left out, the model has no nn.Conv2d layer for Grad-CAM.")
    else:
        rows["GuidedGradCam"] = ExternalExplainer(model, GuidedGradCam(model, layer), "GuidedGradCam")
    return rows, notes
