"""Checks of :class:`~sp_lightning.SemanticPullbackCallback`'s constructor arguments: clear errors before training."""

from __future__ import annotations

from typing import Any

from ..explainers import Explainer
from ..explainers.external import is_captum_attribution
from ..probe.explain import METRICS, REDUCTIONS
from ..sinks import ImageSink


def validate_arguments(options: dict[str, Any]) -> None:
    """Raise a clear error for the first bad argument in ``options`` (the constructor's ``locals()``)."""
    for name in ("num_images", "top_k", "ascent_steps"):
        value = options[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    for name in ("every_n_epochs", "every_n_steps"):
        value = options[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1 or None (never), got {value!r}.")
    if options["every_n_epochs"] is None and options["every_n_steps"] is None and not options["log_at_fit_start"]:
        raise ValueError("Nothing is scheduled: set every_n_epochs, every_n_steps or log_at_fit_start=True.")
    if options["ascent_alpha"] is not None and not options["ascent_alpha"] > 0:
        raise ValueError(f"ascent_alpha must be > 0 or None (automatic), got {options['ascent_alpha']!r}.")
    if options["reduction"] not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {options['reduction']!r}.")
    if options["color_scale"] is not None and not options["color_scale"] > 0:
        raise ValueError(f"color_scale must be > 0 or None (per-image scale), got {options['color_scale']!r}.")
    if not 0.0 <= options["opacity"] <= 1.0:
        raise ValueError(f"opacity must lie in [0, 1], got {options['opacity']!r}.")
    if not 0 < options["min_image_size"] <= options["max_image_size"]:
        raise ValueError(
            f"need 0 < min_image_size <= max_image_size, got {options['min_image_size']} and {options['max_image_size']}."
        )
    if options["on_error"] not in ("raise", "warn"):
        raise ValueError(f"on_error must be 'raise' or 'warn', got {options['on_error']!r}.")
    for name in ("batch_fn", "logits_fn", "denormalize"):
        if options[name] is not None and not callable(options[name]):
            raise TypeError(f"{name} must be callable, got {type(options[name]).__name__}.")
    mean, std = options["mean"], options["std"]
    if (mean is None) != (std is None):
        raise ValueError("Pass mean and std together (per-channel input normalisation), or neither.")
    if std is not None and (len(std) != len(mean) or any(not s > 0 for s in std)):
        raise ValueError(f"mean and std need the same length and std > 0, got mean={mean}, std={std}.")
    bounds = options["input_bounds"]
    if bounds is not None and (not isinstance(bounds, (tuple, list)) or len(bounds) != 2):
        raise ValueError(f"input_bounds must be a pair (low, high), got {bounds!r}.")
    names = options["class_names"]
    if names is not None and not all(isinstance(n, str) for n in names):
        raise TypeError("class_names must be a list of strings.")
    metrics = options["metrics"]
    if metrics is not None and (isinstance(metrics, str) or not all(isinstance(m, str) for m in metrics)):
        raise TypeError(f"metrics must be a list of metric names, e.g. ['random_logit'], got {metrics!r}.")
    unknown = [name for name in metrics or [] if name not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metrics {unknown}; choose from {sorted(METRICS)}.")
    if metrics is not None and len(set(metrics)) != len(metrics):
        raise ValueError(f"metrics lists a name twice: {metrics}.")
    check_explainers(options["explainers"])
    if options["model_attr"] is not None and not isinstance(options["model_attr"], str):
        raise TypeError(f"model_attr must be an attribute name, got {type(options['model_attr']).__name__}.")
    sinks = options["sinks"]
    if sinks is not None and not all(isinstance(s, ImageSink) for s in sinks):
        raise TypeError("sinks must be a list of sp_lightning.sinks.ImageSink objects.")


def check_explainers(explainers: Any) -> None:
    """``explainers=``: a dict of names to callables ``(model, inputs, target)``, Captum attributions or explainers."""
    if explainers is None:
        return
    if not isinstance(explainers, dict):
        raise TypeError(
            "explainers must be a dict of name -> explainer, e.g. {'IG': IntegratedGradients(model)}, "
            f"got {type(explainers).__name__}."
        )
    for name, explain in explainers.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"explainers' names must be non-empty strings (tile captions), got {name!r}.")
        if not (isinstance(explain, Explainer) or is_captum_attribution(explain) or callable(explain)):
            raise TypeError(
                f"explainers[{name!r}] must be a callable (model, inputs, target) -> attribution, a Captum "
                f"Attribution or an sp_lightning explainer, got {type(explain).__name__}."
            )
