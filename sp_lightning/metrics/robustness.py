"""Metrics that re-run the explainer: robustness to input noise and sensitivity to the target (docs/method.md section 6).

Both take the model and an explainer built on it (e.g. ``SoftPullback(model)``); the
explainer restores the model's modes, its own RNG use and ``.grad`` itself. The
attributions passed to ``update`` must be that explainer's raw output for ``target``
(shaped like the inputs).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..explainers.base import Explainer, TargetLike
from .base import ExplainerMetric, evaluating, pearson


class MaxSensitivity(ExplainerMetric):
    """Max-sensitivity (Yeh et al.), lower is better.

    ``samples`` times, every input element gets uniform noise in ``[-radius, radius]``;
    the score is ``max over draws of ||a(x~) - a(x)||_F / ||a(x)||_F`` with ``a`` the
    explainer and ``a(x)`` the attributions passed in (NaN draws are skipped, like
    ``np.nanmax``). Same as ``quantus.MaxSensitivity(nr_samples=10, lower_bound=0.02)``.

    The radius is in input units and does not depend on the input size; 0.02 is 1% of
    the paper's [-1, 1] range, so scale it with the range of other inputs.

    Args:
        explainer: re-run on the noisy inputs (built on ``model``).
        samples: noise draws (paper: 10).
        radius: half-width of the uniform noise (paper: 0.02).

        **kwargs: ``logits_fn``, ``batch_size``, ``seed`` (see :class:`ExplanationMetric`), torchmetrics options.

    Cost: ``samples`` explanations per sample (each a forward and a backward for SP).
    """

    higher_is_better = False

    def __init__(
        self,
        model: nn.Module,
        explainer: Explainer,
        samples: int = 10,
        radius: float = 0.02,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, explainer, **kwargs)
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int, got {samples!r}.")
        if not radius > 0:
            raise ValueError(f"radius must be > 0, got {radius!r}.")
        self.samples, self.radius = samples, float(radius)

    def update(self, inputs: Tensor, attributions: Tensor, target: TargetLike) -> None:
        """Score a batch: inputs (B, ...), the explainer's attributions for them (same shape), target int or (B,)."""
        x, a, t = self._prepare(inputs, attributions, target, same_shape=True)
        batch = x.shape[0]
        reference = a.reshape(batch, -1)
        scale = reference.norm(dim=1)
        per_call = max(1, self.batch_size // batch)
        ratios = []
        for first in range(0, self.samples, per_call):
            draws = min(per_call, self.samples - first)
            noise = torch.stack([self._uniform(tuple(x.shape), -self.radius, self.radius, like=x) for _ in range(draws)])
            noisy = (x.unsqueeze(0) + noise).flatten(0, 1)
            explained = self._explain(noisy, t.repeat(draws)).reshape(draws, batch, -1)
            ratios.append((explained - reference).norm(dim=2) / scale)
        ratios = torch.cat(ratios)
        worst = torch.where(ratios.isnan(), -torch.inf, ratios).amax(dim=0)
        self._record(torch.where(ratios.isnan().all(dim=0), torch.nan, worst))


class RandomLogit(ExplainerMetric):
    """Random logit (Sixt et al.), lower is better.

    The Pearson correlation (the paper's choice; Quantus's default is SSIM) between the
    attributions for the target and the explainer's attributions for a class drawn
    uniformly from the other ``num_classes - 1`` classes. Same as
    ``quantus.RandomLogit(similarity_func=correlation_pearson)`` given the same draws.

    Args:
        explainer: re-run toward the random class (built on ``model``).
        num_classes: classes to draw from; ``None`` reads it from one forward pass.

        **kwargs: ``logits_fn``, ``batch_size``, ``seed`` (see :class:`ExplanationMetric`), torchmetrics options.

    Cost: one explanation per sample: a cheap default for monitoring during training.
    """

    higher_is_better = False

    def __init__(
        self,
        model: nn.Module,
        explainer: Explainer,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, explainer, **kwargs)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2):
            raise ValueError(f"num_classes must be an int >= 2 (or None to read it from the model), got {num_classes!r}.")
        self.num_classes = num_classes

    def update(self, inputs: Tensor, attributions: Tensor, target: TargetLike) -> None:
        """Score a batch: inputs (B, ...), the explainer's attributions for them (same shape), target int or (B,)."""
        x, a, t = self._prepare(inputs, attributions, target, same_shape=True)
        classes = self.num_classes
        if classes is None:
            with evaluating(self.model):
                classes = self._logits(x[:1]).shape[1]
            if classes < 2:
                raise ValueError("RandomLogit needs a model with at least 2 classes.")
        self._check_targets(t, classes)
        draw = self._randint(classes - 1, (x.shape[0],), x.device)
        other = draw + (draw >= t).long()  # uniform over the classes != target
        explained = torch.cat(
            [
                self._explain(x[i : i + self.batch_size], other[i : i + self.batch_size])
                for i in range(0, x.shape[0], self.batch_size)
            ]
        )
        self._record(pearson(a.flatten(1), explained.flatten(1)))
