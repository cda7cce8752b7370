"""Score several explainers with several metrics over a stream of batches, explaining each batch once.

The shapes demo and the soft-training study both ask "how good are the gradient's
and SP's maps on these images?"; :class:`ExplanationScores` is that loop's shared
part. Each batch is explained once per explainer, and every metric of that
explainer scores the same attributions:

- mask metrics (:class:`PointingGame`, :class:`RelevanceMass`) score the
  *relevance* ``|attribution|`` summed over channels (B, 1, H, W) against the
  batch's ground-truth masks;
- every other metric scores the raw attributions (shaped like the inputs), as the
  metrics that re-run the explainer (e.g. :class:`RandomLogit`) require.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from ..explainers.base import Explainer
from .base import ExplanationMetric
from .localisation import _MaskMetric

#: Builds one metric for one explainer, e.g. ``lambda e: PointingGame(e.model)`` or
#: ``lambda e: RandomLogit(e.model, e)``.
MetricFactory = Callable[[Explainer], ExplanationMetric]


class ExplanationScores:
    """Per explainer, per metric running scores over the batches passed to :meth:`update`.

    Args:
        explainers: name -> explainer (each on the model to explain).
        metrics: name -> factory building that metric for one explainer.
    """

    def __init__(self, explainers: Mapping[str, Explainer], metrics: Mapping[str, MetricFactory]) -> None:
        if not explainers or not metrics:
            raise ValueError("ExplanationScores needs at least one explainer and one metric.")
        self.explainers = dict(explainers)
        self.metrics = {
            name: {metric: factory(explainer) for metric, factory in metrics.items()}
            for name, explainer in self.explainers.items()
        }
        self.needs_masks = any(isinstance(m, _MaskMetric) for per in self.metrics.values() for m in per.values())

    def update(self, images: Tensor, labels: Tensor, masks: Tensor | None = None) -> dict[str, Tensor]:
        """Explain ``images`` toward ``labels`` with every explainer, score, and return the attributions by name.

        ``masks`` (B, H, W) are the objects' ground-truth masks, needed by the mask metrics.
        """
        if masks is None and self.needs_masks:
            raise ValueError("The pointing game and relevance mass need ground-truth masks: pass masks (B, H, W).")
        attributions = {name: explainer.attribute(images, labels) for name, explainer in self.explainers.items()}
        for name, attribution in attributions.items():
            relevance = attribution.abs().sum(dim=1, keepdim=True)
            for metric in self.metrics[name].values():
                if isinstance(metric, _MaskMetric):
                    metric.update(images, relevance, labels, masks)
                else:
                    metric.update(images, attribution, labels)
        return attributions

    def compute(self) -> dict[str, dict[str, float]]:
        """Mean score of every metric for every explainer: ``{explainer: {metric: value}}``."""
        return {name: {metric: float(m.compute()) for metric, m in per.items()} for name, per in self.metrics.items()}
