"""Explanation-quality metrics as ``torchmetrics.Metric`` subclasses (docs/method.md section 6).

Every metric is built with the model (and, for those that re-run it, an explainer on
that model) and used as ``metric.update(inputs, attributions, target, ...)``;
``compute()`` returns the mean over all samples (and DDP ranks) and
``per_sample_scores()`` the individual scores. Defaults are the paper's settings for
3x224x224 inputs in [-1, 1], with Quantus 0.6.0 semantics; each docstring says how they
scale to other sizes and what a call costs in model passes per sample:

================================  =================================
metric                            model calls per sample (defaults)
================================  =================================
Focus, PointingGame, RelevanceMass  none
RandomLogit                       1 explanation
FaithfulnessCorrelation           16 forwards
FaithfulnessEstimate              48 forwards
Infidelity                        100 forwards
MaxSensitivity                    10 explanations
MonotonicityCorrelation           480 forwards
================================  =================================

Cheap choices for monitoring during training: the localisation metrics,
``RandomLogit``, ``FaithfulnessCorrelation``, ``Infidelity(repeats=1, patch_sizes=[s])``
(4 forwards with s = half the side) and ``MaxSensitivity(samples=1..2)``.

:class:`ExplanationScores` runs several explainers through several metrics batch by
batch, explaining each batch once.
"""

from .base import ExplainerMetric, ExplanationMetric
from .faithfulness import FaithfulnessCorrelation, FaithfulnessEstimate, Infidelity, MonotonicityCorrelation
from .localisation import Focus, Mosaics, PointingGame, RelevanceMass, make_mosaics
from .quantus_adapter import QuantusExplainFunc, optimal_scaling_loss
from .robustness import MaxSensitivity, RandomLogit
from .scoring import ExplanationScores, MetricFactory

__all__ = [
    "ExplainerMetric",
    "ExplanationMetric",
    "ExplanationScores",
    "FaithfulnessCorrelation",
    "FaithfulnessEstimate",
    "Focus",
    "Infidelity",
    "MaxSensitivity",
    "MetricFactory",
    "MonotonicityCorrelation",
    "Mosaics",
    "PointingGame",
    "QuantusExplainFunc",
    "RandomLogit",
    "RelevanceMass",
    "make_mosaics",
    "optimal_scaling_loss",
]
