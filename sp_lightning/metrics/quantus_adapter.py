"""Quantus interop: our explainers as a Quantus ``explain_func``, and the paper's Infidelity loss.

Quantus calls ``explain_func(model=..., inputs=..., targets=..., **explain_func_kwargs)``
with numpy arrays and expects a numpy array back. Quantus itself is not imported here.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from ..explainers.base import Explainer

ChannelReduction = Literal["sum", "mean"] | None


class QuantusExplainFunc:
    """A Quantus ``explain_func`` backed by an sp-lightning explainer.

    Args:
        explainer: any explainer (``Gradient``, ``SoftPullback``, ``PullbackAscent``, ...).
        channel_reduction: ``None`` returns attributions shaped like the inputs; ``"sum"`` or
            ``"mean"`` reduce dim 1 to one channel (B, 1, H, W), as Quantus's localisation
            metrics expect next to one-channel masks.

    When Quantus passes a model other than the explainer's (MPRT-style randomisation
    metrics pass randomised copies), a copy of the explainer with the same settings is
    run on that model. Inputs go to the device of the model's parameters unless Quantus
    passes ``device``.
    """

    def __init__(self, explainer: Explainer, channel_reduction: ChannelReduction = None) -> None:
        if not isinstance(explainer, Explainer):
            raise TypeError(f"QuantusExplainFunc needs an sp_lightning explainer, got {type(explainer).__name__}.")
        if channel_reduction not in (None, "sum", "mean"):
            raise ValueError(f"channel_reduction must be None, 'sum' or 'mean', got {channel_reduction!r}.")
        self.explainer = explainer
        self.channel_reduction = channel_reduction

    def __call__(
        self, model: nn.Module, inputs: np.ndarray, targets: np.ndarray | int, device: str | None = None, **kwargs: Any
    ) -> np.ndarray:
        """Attributions (float32 numpy) of ``inputs`` toward ``targets``, as Quantus expects."""
        if kwargs:
            raise TypeError(
                f"QuantusExplainFunc got unexpected explain_func_kwargs {sorted(kwargs)}; configure the explainer "
                "object itself (e.g. SoftPullback(model, temperatures=...)) instead."
            )
        explainer = self.explainer
        if model is not explainer.model:
            explainer = copy.copy(explainer)
            explainer.model = model
        parameter = next(model.parameters(), None)
        where = torch.device(device) if device is not None else (parameter.device if parameter is not None else "cpu")
        dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
        x = torch.as_tensor(np.asarray(inputs), device=where, dtype=dtype)
        target = torch.as_tensor(np.asarray(targets), device=where, dtype=torch.long).reshape(-1)
        if target.numel() == 1:
            target = target.expand(x.shape[0])
        attributions = explainer.attribute(x, target)
        if self.channel_reduction == "sum":
            attributions = attributions.sum(dim=1, keepdim=True)
        elif self.channel_reduction == "mean":
            attributions = attributions.mean(dim=1, keepdim=True)
        return attributions.detach().to("cpu", torch.float32).numpy()


def optimal_scaling_loss(a: np.ndarray, b: np.ndarray, batched: bool = True) -> np.ndarray:
    """The paper's Infidelity loss for ``quantus.Infidelity(loss_func=...)``: mean_j (beta a_j - b_j)^2.

    Quantus passes ``a`` = the logit drops and ``b`` = <attribution, x - x_j> (B, J); beta
    is the least-squares scale of ``b`` onto ``a`` (beta = sum(ab) where sum(b^2) = 0).
    Matches :class:`~sp_lightning.metrics.Infidelity`.
    """
    if not batched:
        return optimal_scaling_loss(a[None], b[None])[0]
    drops, dots = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    cross = (dots * drops).sum(axis=-1, keepdims=True)
    energy = (dots**2).sum(axis=-1, keepdims=True)
    beta = np.where(energy == 0, cross, cross / np.where(energy == 0, 1.0, energy))
    return ((beta * dots - drops) ** 2).mean(axis=-1)
