"""One log's explanations, as a pure function: model + probe images -> :class:`Explanations`.

Nothing here knows a Trainer: :func:`explain_probe` takes the model, this rank's probe
images and labels, and frozen :class:`ExplainSettings`; it returns CPU float32 tensors.
The global RNG states, the model's train/eval flags and its parameters' ``.grad`` are
left as they were (the explainers restore them, :func:`isolated_rng` the RNGs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..explainers import Gradient, PullbackAscent, SoftPullback, as_explainer
from ..engine import LogitsFn, SoftRules, preserved_state, read_logits
from ..metrics import (
    ExplainerMetric,
    ExplanationMetric,
    FaithfulnessCorrelation,
    FaithfulnessEstimate,
    Infidelity,
    MaxSensitivity,
    MonotonicityCorrelation,
    RandomLogit,
)
from .selection import isolated_rng, shard_sizes

Reduction = Literal["mean", "sum", "abs_mean", "l2"]
REDUCTIONS: tuple[str, ...] = ("mean", "sum", "abs_mean", "l2")

#: Metrics the callback can log (``metrics=[...]``), with the cost per probe image of the cheap
#: settings :func:`build_metric` gives them.
METRICS: dict[str, type[ExplanationMetric]] = {
    "random_logit": RandomLogit,  # 1 explanation
    "faithfulness_correlation": FaithfulnessCorrelation,  # 16 forwards (4x4 blocks)
    "faithfulness_estimate": FaithfulnessEstimate,  # 48 forwards
    "infidelity": Infidelity,  # repeats=1: 20 forwards (2x2 and 4x4 blocks)
    "max_sensitivity": MaxSensitivity,  # samples=2: 2 explanations
    "monotonicity_correlation": MonotonicityCorrelation,  # samples=1: 48 forwards
}


def reduce_channels(attribution: Tensor, reduction: Reduction = "mean") -> Tensor:
    """Collapse the channel dimension (-3) of ``(..., C, H, W)`` into a ``(..., H, W)`` map.

    ``mean`` and ``sum`` keep the sign (what pushes the logit up or down);
    ``abs_mean`` and ``l2`` give magnitudes only.
    """
    if attribution.dim() < 3:
        raise ValueError(f"attribution must be shaped (..., C, H, W), got {tuple(attribution.shape)}.")
    if reduction == "mean":
        return attribution.mean(dim=-3)
    if reduction == "sum":
        return attribution.sum(dim=-3)
    if reduction == "abs_mean":
        return attribution.abs().mean(dim=-3)
    if reduction == "l2":
        return attribution.norm(dim=-3)
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


@dataclass(frozen=True)
class Explanations:
    """What one log shows for N probe images (CPU, float32; counterfactuals in model-input space)."""

    probabilities: Tensor  # (N, num_classes)
    targets: Tensor  # (N, T): true label (when known) then the top rivals
    soft_maps: Tensor  # (N, T, H, W) channel-reduced Soft Pullbacks
    gradient_maps: Tensor | None = None  # (N, H, W) channel-reduced gradient toward targets[:, 0]
    cosine: Tensor | None = None  # (N,) cosine(gradient, SP) toward targets[:, 0]
    counterfactual_targets: Tensor | None = None  # (N, 2): targets[:, 0] and the runner-up
    counterfactuals: Tensor | None = None  # (N, 2, C, H, W)
    logit_gain: Tensor | None = None  # (N, 2)
    probability_gain: Tensor | None = None  # (N, 2)
    metric_scores: Tensor | None = None  # (N, M) per-image scores of the chosen metrics, in their order
    explainer_maps: Tensor | None = None  # (N, E, H, W) channel-reduced maps of the extra explainers toward targets[:, 0]


@dataclass(frozen=True)
class ExplainSettings:
    """Everything :func:`explain_probe` needs besides the model and the images.

    Args:
        top_k: Soft Pullbacks toward the true label and the ``top_k`` best other classes
            (without labels: the ``top_k`` top predicted classes).
        gradient: also compute the plain gradient and its cosine to the Soft Pullback.
        counterfactual: run Pullback Ascent toward the first two targets.
        ascent_steps: Pullback Ascent iterations.
        alpha: Pullback Ascent step length.
        bounds: per-channel valid input range ``(low, high)``, each ``(C,)``.
        rules: the soft rules and their temperatures.
        logits_fn: maps the model output to ``(B, num_classes)`` logits.
        reduction: channel reduction of the maps.
        metrics: names from :data:`METRICS` to score the Soft Pullback toward the first target.
        seed: seed of the metrics' perturbations.
        explainers: ``(name, explainer)`` pairs of extra explainers (see
            :func:`~sp_lightning.explainers.as_explainer`), each mapped toward the first target.
    """

    top_k: int
    gradient: bool
    counterfactual: bool
    ascent_steps: int
    alpha: float
    bounds: tuple[Tensor, Tensor]
    rules: SoftRules
    logits_fn: LogitsFn | None
    reduction: Reduction
    metrics: tuple[str, ...]
    seed: int
    explainers: tuple[tuple[str, Any], ...] = ()


def no_autocast(device: torch.device) -> Any:
    """Autocast off on ``device`` (explanations run in the parameters' own precision)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


def probe_logits(model: nn.Module, images: Tensor, logits_fn: LogitsFn | None) -> Tensor:
    """Eval-mode logits without a graph; the model's train/eval flags are restored."""
    with preserved_state(model, []), torch.no_grad(), no_autocast(images.device):
        return read_logits(model, images, logits_fn)


def rank_targets(probabilities: Tensor, labels: Tensor | None, top_k: int) -> tuple[Tensor, Tensor]:
    """SP targets (true label + top-k rivals, or top-k) and counterfactual targets (first two of the ranking)."""
    if labels is None:
        ranked = probabilities.argsort(dim=1, descending=True)
        return ranked[:, :top_k], ranked[:, :2]
    rivals = probabilities.scatter(1, labels[:, None], -1.0).argsort(dim=1, descending=True)
    ranked = torch.cat([labels[:, None], rivals], dim=1)
    return ranked[:, : top_k + 1], ranked[:, :2]


def metric_options(name: str, classes: int, bounds: tuple[Tensor, Tensor], cheap: bool) -> dict[str, Any]:
    """Constructor options of metric ``name`` (a key of :data:`METRICS`) for inputs within ``bounds``.

    The paper's settings, moved from its [-1, 1] inputs to this range (uniform perturbations
    span it, MaxSensitivity's radius stays 1% of it); patch and step sizes scale with the
    input size inside the metrics. ``cheap``: the callback's settings, fewer draws (Infidelity
    1 round, MaxSensitivity 2 draws, MonotonicityCorrelation 1 draw per step).
    """
    low, high = bounds
    uniform = (float(low.min()), float(high.max()))
    options: dict[str, Any] = {
        "random_logit": {"num_classes": classes},
        "infidelity": {"uniform_range": uniform},
        "max_sensitivity": {"radius": 0.01 * float((high - low).mean())},
        "monotonicity_correlation": {"uniform_range": uniform},
    }.get(name, {})
    if cheap:
        options.update({"infidelity": {"repeats": 1}, "max_sensitivity": {"samples": 2},
                        "monotonicity_correlation": {"samples": 1}}.get(name, {}))
    return options


def build_metric(
    name: str, model: nn.Module, explainer: SoftPullback, classes: int, settings: ExplainSettings
) -> ExplanationMetric:
    """A fresh metric ``name`` on ``model`` with cheap settings scaled to the valid input range.

    Fresh at every log, seeded with ``settings.seed``: the same draws each time, and no state
    kept. ``sync_on_compute=False``: the callback gathers the per-image scores itself.
    """
    options = metric_options(name, classes, settings.bounds, cheap=True)
    cls = METRICS[name]
    if issubclass(cls, ExplainerMetric):
        options["explainer"] = explainer
    return cls(model, logits_fn=settings.logits_fn, seed=settings.seed, sync_on_compute=False, **options)


def explain_probe(model: nn.Module, images: Tensor, labels: Tensor | None, settings: ExplainSettings) -> Explanations:
    """All explanations for ``images`` (on the model's device); works under ``torch.inference_mode`` too.

    Example:
        >>> import torch
        >>> from sp_lightning.engine import SoftRules
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
        >>> bounds = (torch.zeros(3), torch.ones(3))
        >>> settings = ExplainSettings(top_k=1, gradient=True, counterfactual=True, ascent_steps=2, alpha=0.1,
        ...     bounds=bounds, rules=SoftRules.create(None), logits_fn=None, reduction="mean", metrics=(), seed=0)
        >>> explain_probe(model, torch.rand(2, 3, 2, 2), torch.tensor([0, 2]), settings).soft_maps.shape
        torch.Size([2, 2, 2, 2])
    """
    with isolated_rng(), torch.inference_mode(False), no_autocast(images.device):
        images = images.clone()  # a normal tensor even if the caller is in inference mode
        logits = probe_logits(model, images, settings.logits_fn).float()
        probabilities = logits.softmax(dim=1)
        targets, cf_targets = rank_targets(probabilities, labels, settings.top_k)
        explainer = SoftPullback(model, settings.rules, settings.logits_fn)
        raw = explainer.attribute(images, targets)
        soft = raw.float()
        fields: dict[str, Tensor] = {
            "probabilities": probabilities,
            "targets": targets,
            "soft_maps": reduce_channels(soft, settings.reduction),
        }
        if settings.metrics:
            scores = []
            for name in settings.metrics:
                metric = build_metric(name, model, explainer, logits.shape[1], settings)
                metric.update(images, raw[:, 0], targets[:, 0])
                scores.append(metric.per_sample_scores())
            fields["metric_scores"] = torch.stack(scores, dim=1)
        if settings.gradient:
            grad = Gradient(model, settings.logits_fn).attribute(images, targets[:, 0]).float()
            fields["cosine"] = F.cosine_similarity(grad.flatten(1), soft[:, 0].flatten(1), dim=1)
            fields["gradient_maps"] = reduce_channels(grad, settings.reduction)
        if settings.explainers:
            fields["explainer_maps"] = torch.stack([
                reduce_channels(as_explainer(explain, model, name).attribute(images, targets[:, 0]).float(),
                                settings.reduction)
                for name, explain in settings.explainers
            ], dim=1)
        if settings.counterfactual:
            fields.update(_counterfactuals(model, images, logits, targets, cf_targets, raw, settings))
    return Explanations(**{name: value.detach().cpu() for name, value in fields.items()})


def _counterfactuals(
    model: nn.Module, images: Tensor, logits: Tensor, targets: Tensor, cf_targets: Tensor, raw: Tensor,
    settings: ExplainSettings,
) -> dict[str, Tensor]:
    """Pullback Ascent toward ``cf_targets`` and what it gained in logit and probability."""
    ascent = PullbackAscent(
        model, settings.alpha, settings.ascent_steps, clip="every", bounds=settings.bounds,
        temperatures=settings.rules, logits_fn=settings.logits_fn,
    )
    # The ascent's first step is the Soft Pullback toward its targets, already computed when
    # they lead the SP targets (always with labels; with top_k >= 2 without).
    count = cf_targets.shape[1]
    first = raw[:, :count] if torch.equal(targets[:, :count], cf_targets) else None
    counterfactuals = ascent.ascend(images, cf_targets, first=first).counterfactual
    moved = probe_logits(model, counterfactuals.flatten(0, 1), settings.logits_fn).float().unflatten(0, cf_targets.shape)
    probabilities = logits.softmax(dim=1)
    return {
        "counterfactual_targets": cf_targets,
        "counterfactuals": counterfactuals.float(),
        "logit_gain": moved.gather(2, cf_targets[..., None]).squeeze(2) - logits.gather(1, cf_targets),
        "probability_gain": (
            moved.softmax(dim=2).gather(2, cf_targets[..., None]).squeeze(2) - probabilities.gather(1, cf_targets)
        ),
    }


def merge_shards(shards: Sequence[Explanations | None], world_size: int, count: int | None = None) -> Explanations:
    """Put per-rank results back in probe order: rank r explained images r, r + world_size, ...

    ``count``: the number of probe images; each shard's padding past its real images
    (:meth:`~sp_lightning.probe.selection.ProbeSet.shard`) is dropped.
    """
    if count is not None:
        shards = [
            None if shard is None or size == 0 else _first(shard, size)
            for shard, size in zip(shards, shard_sizes(count, world_size))
        ]
    present = [(rank, shard) for rank, shard in enumerate(shards) if shard is not None]
    order = torch.cat(
        [torch.arange(rank, rank + world_size * len(shard.targets), world_size) for rank, shard in present]
    )
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order))
    merged = {}
    for field in dataclasses.fields(Explanations):
        parts = [getattr(shard, field.name) for _, shard in present]
        merged[field.name] = None if parts[0] is None else torch.cat(parts)[inverse]
    return Explanations(**merged)


def _first(shard: Explanations, size: int) -> Explanations:
    """The first ``size`` images' results of one shard."""
    return Explanations(**{
        field.name: None if getattr(shard, field.name) is None else getattr(shard, field.name)[:size]
        for field in dataclasses.fields(Explanations)
    })


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each pair of maps ``(N, ...)``; 0 where a map is constant."""
    a = a.flatten(1) - a.flatten(1).mean(dim=1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(dim=1, keepdim=True)
    denominator = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(torch.finfo(a.dtype).tiny)
    return (a * b).sum(dim=1) / denominator


def warn_if_not_finite(result: Explanations, step: int) -> None:
    """Say so when the model's outputs or its explanations hold NaN or infinite values (e.g. training diverged)."""
    broken = [name for name in ("probabilities", "soft_maps") if not bool(torch.isfinite(getattr(result, name)).all())]
    if broken:
        rank_zero_warn(
            f"SemanticPullbackCallback at step {step}: the {' and '.join(broken)} hold NaN or infinite values "
            "(has training diverged?); their tiles are flagged in the panels."
        )


def scalars(result: Explanations, tag: str, metrics: Sequence[str], drift: Tensor | None) -> dict[str, float]:
    """The probe-set means a log reports, keyed ``<tag>/<name>`` (``metrics``: the names of ``metric_scores``' columns)."""
    values: dict[str, float] = {}
    if result.cosine is not None:
        values[f"{tag}/cosine_gradient_sp"] = float(result.cosine.mean())
    if drift is not None:
        values[f"{tag}/drift_correlation"] = float(drift.mean())
    if result.logit_gain is not None and result.probability_gain is not None:
        for column, suffix in ((0, ""), (1, "_runner_up")):
            values[f"{tag}/counterfactual_logit_gain{suffix}"] = float(result.logit_gain[:, column].mean())
            values[f"{tag}/counterfactual_probability_gain{suffix}"] = float(result.probability_gain[:, column].mean())
    if result.metric_scores is not None:
        for name, scores in zip(metrics, result.metric_scores.T):
            values[f"{tag}/metrics/{name}"] = float(scores.nanmean())
    return values


def check_model(
    model: nn.Module, images: Tensor, labels: Tensor | None, top_k: int, logits_fn: LogitsFn | None,
    class_names: Sequence[str] | None,
) -> None:
    """Run the probe images once: clear errors now for unreadable logits, too few classes and out-of-range targets."""
    try:
        logits = probe_logits(model, images, logits_fn)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"SemanticPullbackCallback cannot read logits from {type(model).__name__} on the probe images: {exc} "
            "The callback needs a forward mapping images to (B, num_classes) logits; set model_attr=... or "
            "logits_fn=...."
        ) from exc
    classes = logits.shape[1]
    if classes < 2:
        raise ValueError(f"The model outputs {classes} logit(s); explanations need at least 2 classes.")
    rivals = classes - 1 if labels is not None else classes
    if top_k > rivals:
        raise ValueError(f"top_k={top_k} but the model has only {rivals} classes to rank; lower top_k.")
    if labels is not None and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(
            f"Probe labels range over [{int(labels.min())}, {int(labels.max())}] but the model has {classes} "
            f"classes (valid targets 0..{classes - 1})."
        )
    if class_names is not None and len(class_names) != classes:
        raise ValueError(f"Got {len(class_names)} class names for a model with {classes} classes.")
