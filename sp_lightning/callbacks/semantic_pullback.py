"""``SemanticPullbackCallback``: watch Soft Pullbacks and counterfactuals evolve while a classifier trains.

A thin layer over the engine's explainers (:class:`~sp_lightning.SoftPullback`,
:class:`~sp_lightning.PullbackAscent`, :class:`~sp_lightning.Gradient`) and the
pure picture functions of :mod:`sp_lightning.visualize`. It owns three things:
the probe set (fixed images, saved in checkpoints), the schedule, and where the
pictures and scalars go (TensorBoard, else PNG files).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor, nn

from ..explainers import Gradient, PullbackAscent, SoftPullback, equivalent_alpha
from ..explainers.base import LogitsFn, preserved_state
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
from ..rules.config import SoftRules
from ..visualize import REDUCTIONS, Reduction, explanation_panel, grid, reduce_channels, save_png
from .probe import BatchFn, ProbeSet, isolated_rng, select_probe, validate_probe

OnError = Literal["raise", "warn"]

#: Metrics the callback can log (``metrics=[...]``), with the cost per probe image of the cheap
#: settings it builds them with (see :meth:`SemanticPullbackCallback._build_metric`).
METRICS: dict[str, type[ExplanationMetric]] = {
    "random_logit": RandomLogit,  # 1 explanation
    "faithfulness_correlation": FaithfulnessCorrelation,  # 16 forwards (4x4 blocks)
    "faithfulness_estimate": FaithfulnessEstimate,  # 48 forwards
    "infidelity": Infidelity,  # repeats=1: 20 forwards (2x2 and 4x4 blocks)
    "max_sensitivity": MaxSensitivity,  # samples=2: 2 explanations
    "monotonicity_correlation": MonotonicityCorrelation,  # samples=1: 48 forwards
}


@dataclass
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


def merge_shards(shards: Sequence[Explanations | None], world_size: int) -> Explanations:
    """Put per-rank results back in probe order: rank r explained images r, r + world_size, ..."""
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


def correlation(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each pair of maps ``(N, ...)``; 0 where a map is constant."""
    a = a.flatten(1) - a.flatten(1).mean(dim=1, keepdim=True)
    b = b.flatten(1) - b.flatten(1).mean(dim=1, keepdim=True)
    denominator = (a.norm(dim=1) * b.norm(dim=1)).clamp_min(torch.finfo(a.dtype).tiny)
    return (a * b).sum(dim=1) / denominator


def _no_autocast(device: torch.device) -> Any:
    """Autocast off on ``device`` (explanations run in the parameters' own precision)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for drawing panels: on ~100 KB tensors, waking a thread pool costs more than the work.

    The setting belongs to the calling thread (OpenMP), so the background drawing thread
    keeps one thread for its whole life without touching the training thread's.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _drawing_thread_init() -> None:
    """Initialiser of the background drawing thread: one intra-op thread (see :func:`one_thread`).

    On Linux the thread also takes the lowest CPU priority (a per-thread nice value), so when
    training keeps every core busy the drawing fills the gaps instead of preempting training's
    OpenMP threads, whose barriers stall whenever one of them is descheduled.
    """
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class SemanticPullbackCallback(Callback):
    """Log Soft Pullbacks, counterfactuals and the gradient of a few fixed images while a classifier trains.

    ``L.Trainer(callbacks=[SemanticPullbackCallback()])`` works with no arguments on
    any LightningModule whose forward maps a batch of images to logits.

    Probe set:
        num_images: how many images to take from the validation dataloader (seeded,
            class-balanced where labels exist, stored in checkpoints).
        images: your own probe images (N, C, H, W) instead, or a path to a ``torch.save``
            file holding that tensor or a dict with ``"images"`` (and ``"labels"``).
            All of them are used.
        labels: class indices (N,) for ``images`` (optional).
        batch_fn: maps a validation batch to ``(images, labels or None)``; default: the
            first element of a tuple/list (and the second if it holds class indices),
            or dict keys such as ``"image"``/``"label"``. In YAML, a dotted import path.
        seed: seed of the callback's own generator for picking probe images.
    Schedule:
        every_n_epochs: log at the end of every n-th training epoch (``None``: never).
        every_n_steps: log every n optimizer steps (``None``: never).
        log_at_fit_start: log a baseline when training starts (step 0, or the resume
            step unless it was logged before the checkpoint), never during the sanity check.
    Explanations:
        top_k: Soft Pullbacks toward the true label and the k highest-scoring other
            classes (without labels: the k top predicted classes).
        gradient: also compute the plain gradient (a panel tile and the cosine scalar).
        counterfactual: run Pullback Ascent toward the true label and the runner-up
            (without labels: the top two predicted classes), clipped every step to the
            valid input range.
        ascent_steps: Pullback Ascent iterations.
        ascent_alpha: step length; ``None`` keeps the paper's per-element step for this
            input size and range (:func:`~sp_lightning.equivalent_alpha`).
        temperatures: soft-rule temperatures (rule name -> value, ``None`` = rule off).
        model_attr: explain ``getattr(pl_module, model_attr)`` instead of the module itself.
        logits_fn: maps the model output to (B, num_classes) logits (dotted path in YAML).
        metrics: names of :mod:`sp_lightning.metrics` to log every time (``None``: none), each
            the mean over the probe set under ``<tag>/metrics/<name>``, scoring the Soft
            Pullback toward the first target (the true label; without labels the top class)
            that the log already computed. Choose from ``random_logit``,
            ``faithfulness_correlation``, ``faithfulness_estimate``, ``infidelity``
            (``repeats=1``), ``max_sensitivity`` (``samples=2``, radius 1% of the valid input
            range) and ``monotonicity_correlation`` (``samples=1``); uniform perturbations span
            the valid input range. Each is seeded with ``seed`` and redrawn the same way at every
            log (the curves show the model changing, not new noise), never touching the global RNG.
    Pictures:
        reduction: channel reduction of heatmaps: ``mean``, ``sum``, ``abs_mean``, ``l2``.
        color_scale: fixed heatmap scale (values at +-color_scale are full colour) so
            brightness is comparable across steps; ``None`` normalises each map.
        overlay: blend heatmaps over the grey input; opacity: their strongest blend weight.
        min_image_size / max_image_size: tiles are enlarged / shrunk to this many pixels.
        mean / std: per-channel normalisation of the inputs, to show images as a person
            sees them and to clip counterfactuals to the valid range; otherwise taken
            from the datamodule's ``mean`` / ``std`` attributes when present.
        denormalize: a function mapping model inputs to display images in [0, 1]
            (overrides mean/std for display).
        input_bounds: ``(low, high)`` valid model-input range (numbers or per channel);
            default ``(-mean/std, (1-mean)/std)``, else [0, 1] when the probe images lie
            in it, else the probe set's per-channel range (with a warning).
        class_names: names for the class indices; else the datamodule's ``class_names``
            or ``classes`` attribute.
    Output:
        tag: prefix of every TensorBoard tag.
        png_dir: where PNGs go when there is no TensorBoard logger (default: the first
            logger's log directory, else the trainer's ``default_root_dir``).
        on_error: ``"warn"`` reports a failed explanation and lets training continue;
            ``"raise"`` stops training. The model is restored either way.
        background: draw the panels and write the images on a background thread (at the
            lowest CPU priority on Linux), so training goes on meanwhile; explanations
            themselves always run on the training thread, between steps. At most one log's
            images are pending; they are finished before the next log and when training
            ends. A failure there is reported (``on_error``) at the next log or at the end.
            ``False``: draw inline.

    Under DDP every rank explains (and scores) its share of the probe images and rank 0 writes.
    FSDP, DeepSpeed and ModelParallel strategies shard parameters and are refused at fit start.
    """

    def __init__(
        self,
        num_images: int = 8,
        images: Tensor | str | None = None,
        labels: Tensor | list[int] | None = None,
        batch_fn: BatchFn | None = None,
        seed: int = 0,
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        log_at_fit_start: bool = True,
        top_k: int = 3,
        gradient: bool = True,
        counterfactual: bool = True,
        ascent_steps: int = 5,
        ascent_alpha: float | None = None,
        temperatures: dict[str, float | bool | None] | None = None,
        model_attr: str | None = None,
        logits_fn: LogitsFn | None = None,
        metrics: list[str] | None = None,
        reduction: Reduction = "mean",
        color_scale: float | None = None,
        overlay: bool = True,
        opacity: float = 0.8,
        min_image_size: int = 128,
        max_image_size: int = 256,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        denormalize: Callable[[Tensor], Tensor] | None = None,
        input_bounds: tuple[float | list[float], float | list[float]] | None = None,
        class_names: list[str] | None = None,
        tag: str = "semantic_pullback",
        png_dir: str | None = None,
        on_error: OnError = "warn",
        background: bool = True,
    ) -> None:
        super().__init__()
        for name, value in {"num_images": num_images, "top_k": top_k, "ascent_steps": ascent_steps}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
        for name, value in {"every_n_epochs": every_n_epochs, "every_n_steps": every_n_steps}.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1 or None (never), got {value!r}.")
        if every_n_epochs is None and every_n_steps is None and not log_at_fit_start:
            raise ValueError(
                "Nothing is scheduled: set every_n_epochs, every_n_steps or log_at_fit_start=True."
            )
        if ascent_alpha is not None and not ascent_alpha > 0:
            raise ValueError(f"ascent_alpha must be > 0 or None (automatic), got {ascent_alpha!r}.")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
        if color_scale is not None and not color_scale > 0:
            raise ValueError(f"color_scale must be > 0 or None (per-image scale), got {color_scale!r}.")
        if not 0.0 <= opacity <= 1.0:
            raise ValueError(f"opacity must lie in [0, 1], got {opacity!r}.")
        if not 0 < min_image_size <= max_image_size:
            raise ValueError(
                f"need 0 < min_image_size <= max_image_size, got {min_image_size} and {max_image_size}."
            )
        if on_error not in ("raise", "warn"):
            raise ValueError(f"on_error must be 'raise' or 'warn', got {on_error!r}.")
        for name, fn in {"batch_fn": batch_fn, "logits_fn": logits_fn, "denormalize": denormalize}.items():
            if fn is not None and not callable(fn):
                raise TypeError(f"{name} must be callable, got {type(fn).__name__}.")
        if (mean is None) != (std is None):
            raise ValueError("Pass mean and std together (per-channel input normalisation), or neither.")
        if std is not None and (len(std) != len(mean) or any(not s > 0 for s in std)):
            raise ValueError(f"mean and std need the same length and std > 0, got mean={mean}, std={std}.")
        if input_bounds is not None and (not isinstance(input_bounds, (tuple, list)) or len(input_bounds) != 2):
            raise ValueError(f"input_bounds must be a pair (low, high), got {input_bounds!r}.")
        if class_names is not None and not all(isinstance(n, str) for n in class_names):
            raise TypeError("class_names must be a list of strings.")
        if metrics is not None and (isinstance(metrics, str) or not all(isinstance(m, str) for m in metrics)):
            raise TypeError(f"metrics must be a list of metric names, e.g. ['random_logit'], got {metrics!r}.")
        unknown = [name for name in metrics or [] if name not in METRICS]
        if unknown:
            raise ValueError(f"Unknown metrics {unknown}; choose from {sorted(METRICS)}.")
        if metrics is not None and len(set(metrics)) != len(metrics):
            raise ValueError(f"metrics lists a name twice: {metrics}.")
        if model_attr is not None and not isinstance(model_attr, str):
            raise TypeError(f"model_attr must be an attribute name, got {type(model_attr).__name__}.")
        self.num_images, self.seed, self.batch_fn = num_images, int(seed), batch_fn
        self.every_n_epochs, self.every_n_steps, self.log_at_fit_start = every_n_epochs, every_n_steps, log_at_fit_start
        self.top_k, self.gradient, self.counterfactual = top_k, gradient, counterfactual
        self.ascent_steps, self.ascent_alpha = ascent_steps, ascent_alpha
        self.rules = SoftRules.create(temperatures)
        self.model_attr, self.logits_fn = model_attr, logits_fn
        self.metrics = list(metrics or [])
        self.reduction, self.color_scale, self.overlay, self.opacity = reduction, color_scale, overlay, opacity
        self.min_image_size, self.max_image_size = min_image_size, max_image_size
        self.mean, self.std, self.denormalize, self.input_bounds = mean, std, denormalize, input_bounds
        self.class_names = list(class_names) if class_names is not None else None
        self.tag, self.png_dir, self.on_error, self.background = tag, png_dir, on_error, bool(background)
        self._user_probe = self._read_user_probe(images, labels)
        self._probe: ProbeSet | None = None
        self._previous: Tensor | None = None
        self._last_step: int | None = None
        self._warned_png = False
        self._drawing: ThreadPoolExecutor | None = None  # rank 0's background drawing thread
        self._pending: tuple[int, Future[None]] | None = None  # (step, its images being drawn and written)
        # resolved at fit start
        self._names: list[str] | None = None
        self._bounds: tuple[Tensor, Tensor] | None = None
        self._alpha = 0.0

    # ------------------------------------------------------------------ state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tag=self.tag)

    def state_dict(self) -> dict[str, Any]:
        """The probe set and what drift needs, so a resumed run explains the same images."""
        probe = self._probe
        return {
            "images": None if probe is None else probe.images,
            "labels": None if probe is None else probe.labels,
            "indices": None if probe is None else probe.indices,
            "previous": self._previous,
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("images") is not None:
            validate_probe(state_dict["images"], state_dict.get("labels"))
            self._probe = ProbeSet(state_dict["images"], state_dict.get("labels"), state_dict.get("indices"))
        self._previous = state_dict.get("previous")
        self._last_step = state_dict.get("last_step")

    @property
    def probe(self) -> ProbeSet | None:
        """The probe images (and labels) in use; ``None`` before fit start."""
        return self._probe

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build and check everything, so problems surface before any training step."""
        if isinstance(trainer.strategy, (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)):
            raise RuntimeError(
                f"SemanticPullbackCallback does not support {type(trainer.strategy).__name__}: it shards the "
                "parameters, so the model cannot be run outside the wrapper on one rank. Use DDP, or explain a "
                "saved checkpoint with sp_lightning's explainers after training."
            )
        model = self._model(pl_module)
        if self._probe is None:
            self._probe = self._build_probe(trainer, pl_module)
        self._resolve_display(trainer)
        self._check_model(model)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The baseline: after the sanity check and after a resumed run's step counter is restored."""
        if self.log_at_fit_start:
            self.log_explanations(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0:
            self.log_explanations(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.log_explanations(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wait()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Training already failed: finish the pending images, but only warn about their own failure."""
        try:
            self._stop_drawing()
        except Exception as error:  # on_error="raise" must not hide the exception that stopped training
            rank_zero_warn(str(error))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Finish pending images (e.g. from ``log_explanations`` under ``trainer.validate``)."""
        self._stop_drawing()

    def _stop_drawing(self) -> None:
        """Wait for the pending images, then end the drawing thread (a new one starts with the next log)."""
        try:
            self.wait()
        finally:
            if self._drawing is not None:
                self._drawing.shutdown()
                self._drawing = None

    def wait(self) -> None:
        """Block until the last log's images are written; report their failure as ``on_error`` says."""
        if self._pending is None:
            return
        step, future = self._pending
        self._pending = None
        error = future.exception()
        if error is not None:
            self._fail(step, self._describe(error), error)

    # ------------------------------------------------------------------ set-up

    @staticmethod
    def _read_user_probe(images: Tensor | str | None, labels: Tensor | list[int] | None) -> ProbeSet | None:
        if images is None:
            if labels is not None:
                raise ValueError("labels were given without images; pass images=... too.")
            return None
        if isinstance(images, str):
            loaded = torch.load(images, map_location="cpu", weights_only=True)
            if isinstance(loaded, Mapping):
                if labels is not None and loaded.get("labels") is not None:
                    raise ValueError(f"{images} already holds labels; do not pass labels=... as well.")
                labels = loaded.get("labels", labels)
                loaded = loaded.get("images")
            images = loaded
        if labels is not None and not isinstance(labels, Tensor):
            labels = torch.as_tensor(labels, dtype=torch.long)
        validate_probe(images, labels)
        return ProbeSet(images.detach().to("cpu", torch.float32).clone(), None if labels is None else labels.cpu())

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module to explain: the LightningModule itself (never a DDP wrapper) or one of its attributes."""
        if self.model_attr is None:
            return pl_module
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, nn.Module):
            raise AttributeError(
                f"model_attr={self.model_attr!r}: {type(pl_module).__name__} has no nn.Module attribute of that name."
            )
        return model

    def _build_probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> ProbeSet:
        if self._user_probe is not None:
            return self._user_probe
        loader = self._validation_loader(trainer, pl_module)
        if loader is None:
            raise RuntimeError(
                "SemanticPullbackCallback needs probe images: give the Trainer validation data "
                "(val_dataloaders=... or a val_dataloader() method) or pass images=... to the callback."
            )
        probe = select_probe(loader, self.num_images, self.seed, self.batch_fn)
        # every rank should explain the same images, even if its data differs (e.g. per-rank transforms)
        return trainer.strategy.broadcast(probe, src=0)

    @staticmethod
    def _validation_loader(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        """The first validation dataloader: Lightning's own, else the datamodule's or module's hook."""
        with isolated_rng():
            loaders = None
            if trainer.enable_validation:
                trainer.fit_loop.epoch_loop.val_loop.setup_data()
                loaders = trainer.val_dataloaders
            if loaders is None and trainer.datamodule is not None and is_overridden("val_dataloader", trainer.datamodule):
                loaders = trainer.datamodule.val_dataloader()
            if loaders is None and is_overridden("val_dataloader", pl_module):
                loaders = pl_module.val_dataloader()
        if isinstance(loaders, Mapping):
            loaders = next(iter(loaders.values()), None)
        if isinstance(loaders, (list, tuple)):
            loaders = loaders[0] if loaders else None
        return loaders

    def _resolve_display(self, trainer: pl.Trainer) -> None:
        """Class names, valid input bounds and the ascent step, from the user or the datamodule."""
        assert self._probe is not None
        images = self._probe.images
        channels = images.shape[1]
        datamodule = trainer.datamodule
        names = self.class_names
        for attribute in ("class_names", "classes"):
            if names is None and datamodule is not None:
                names = getattr(datamodule, attribute, None)
        self._names = [str(n) for n in names] if names is not None else None
        mean, std = self.mean, self.std
        if mean is None and datamodule is not None and getattr(datamodule, "mean", None) is not None:
            mean, std = datamodule.mean, getattr(datamodule, "std", None)
            if std is None:
                raise ValueError(f"{type(datamodule).__name__} has a `mean` attribute but no `std`; give it both.")
        if self.input_bounds is not None:
            low, high = (self._per_channel(b, channels, "input_bounds") for b in self.input_bounds)
        elif mean is not None:
            mean_t = self._per_channel(mean, channels, "mean")
            std_t = self._per_channel(std, channels, "std")
            low, high = (0.0 - mean_t) / std_t, (1.0 - mean_t) / std_t
        elif images.min() >= 0 and images.max() <= 1:
            low, high = torch.zeros(channels), torch.ones(channels)
        else:
            low, high = images.amin(dim=(0, 2, 3)), images.amax(dim=(0, 2, 3))
            rank_zero_warn(
                "SemanticPullbackCallback: the probe images are not in [0, 1] and no normalisation is known, so "
                "images are shown and counterfactuals clipped using the probe set's own range. Pass mean/std "
                "(or input_bounds / denormalize), or give the datamodule `mean` and `std` attributes."
            )
        if bool((high <= low).any()):
            raise ValueError(f"The valid input range is empty in some channel: low={low.tolist()}, high={high.tolist()}.")
        self._bounds = (low.contiguous(), high.contiguous())
        width = float((high - low).mean())
        self._alpha = self.ascent_alpha or equivalent_alpha(images.shape[1:], range_width=width)

    @staticmethod
    def _per_channel(value: Any, channels: int, name: str) -> Tensor:
        """One float per channel from a number or a per-channel sequence."""
        values = torch.as_tensor(value, dtype=torch.float32).flatten()
        if values.numel() not in (1, channels):
            raise ValueError(
                f"{name} has {values.numel()} values but the probe images have {channels} channels "
                "(give one value, or one per channel)."
            )
        return values.expand(channels).clone()

    def _check_model(self, model: nn.Module) -> None:
        """Run the probe set once: clear errors now for unreadable logits and out-of-range targets."""
        assert self._probe is not None
        images, labels = self._device_probe(model)
        try:
            logits = self._logits(model, images)
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
        if self.top_k > rivals:
            raise ValueError(f"top_k={self.top_k} but the model has only {rivals} classes to rank; lower top_k.")
        if labels is not None and (int(labels.min()) < 0 or int(labels.max()) >= classes):
            raise ValueError(
                f"Probe labels range over [{int(labels.min())}, {int(labels.max())}] but the model has {classes} "
                "classes (valid targets 0.." + f"{classes - 1})."
            )
        if self._names is not None and len(self._names) != classes:
            raise ValueError(f"Got {len(self._names)} class names for a model with {classes} classes.")

    # ------------------------------------------------------------------ computing

    @staticmethod
    def _dtype_device(model: nn.Module) -> tuple[torch.dtype, torch.device]:
        param = next((p for p in model.parameters() if p.is_floating_point()), None)
        return (param.dtype, param.device) if param is not None else (torch.float32, torch.device("cpu"))

    def _device_probe(self, model: nn.Module, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor | None]:
        """This rank's share of the probe set on the model's device and dtype."""
        assert self._probe is not None
        dtype, device = self._dtype_device(model)
        images = self._probe.images[rank::world_size].to(device=device, dtype=dtype)
        labels = self._probe.labels
        return images, None if labels is None else labels[rank::world_size].to(device)

    def _logits(self, model: nn.Module, images: Tensor) -> Tensor:
        """Eval-mode logits without a graph; the model's train/eval flags are restored."""
        with preserved_state(model, []), torch.no_grad(), _no_autocast(images.device):
            return Gradient(model, self.logits_fn).logits(images)

    def _targets(self, probabilities: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """SP targets (true label + top-k rivals, or top-k) and counterfactual targets (first two of the ranking)."""
        if labels is None:
            ranked = probabilities.argsort(dim=1, descending=True)
            return ranked[:, : self.top_k], ranked[:, :2]
        rivals = probabilities.scatter(1, labels[:, None], -1.0).argsort(dim=1, descending=True)
        ranked = torch.cat([labels[:, None], rivals], dim=1)
        return ranked[:, : self.top_k + 1], ranked[:, :2]

    def explain(self, model: nn.Module, images: Tensor, labels: Tensor | None) -> Explanations:
        """All explanations for ``images`` (on the model's device); runs under ``torch.inference_mode`` too."""
        assert self._bounds is not None
        with isolated_rng(), torch.inference_mode(False), _no_autocast(images.device):
            images = images.clone()  # a normal tensor even if the caller is in inference mode
            logits = self._logits(model, images).float()
            probabilities = logits.softmax(dim=1)
            targets, cf_targets = self._targets(probabilities, labels)
            explainer = SoftPullback(model, self.rules, self.logits_fn)
            raw = explainer.attribute(images, targets)
            soft = raw.float()
            result = Explanations(probabilities, targets, reduce_channels(soft, self.reduction))
            if self.metrics:
                scores = []
                for name in self.metrics:
                    metric = self._build_metric(name, model, explainer, logits.shape[1])
                    metric.update(images, raw[:, 0], targets[:, 0])
                    scores.append(metric.per_sample_scores())
                result.metric_scores = torch.stack(scores, dim=1)
            if self.gradient:
                grad = Gradient(model, self.logits_fn).attribute(images, targets[:, 0]).float()
                result.cosine = F.cosine_similarity(grad.flatten(1), soft[:, 0].flatten(1), dim=1)
                result.gradient_maps = reduce_channels(grad, self.reduction)
            if self.counterfactual:
                ascent = PullbackAscent(
                    model, self._alpha, self.ascent_steps, clip="every", bounds=self._bounds,
                    temperatures=self.rules, logits_fn=self.logits_fn,
                )
                # The ascent's first step is the Soft Pullback toward its targets, already computed
                # when they lead the SP targets (always with labels; with top_k >= 2 without).
                count = cf_targets.shape[1]
                first = raw[:, :count] if torch.equal(targets[:, :count], cf_targets) else None
                counterfactuals = ascent.ascend(images, cf_targets, first=first).counterfactual
                moved = self._logits(model, counterfactuals.flatten(0, 1)).float().unflatten(0, cf_targets.shape)
                picked = moved.gather(2, cf_targets[..., None]).squeeze(2)
                result.counterfactual_targets = cf_targets
                result.counterfactuals = counterfactuals.float()
                result.logit_gain = picked - logits.gather(1, cf_targets)
                result.probability_gain = (
                    moved.softmax(dim=2).gather(2, cf_targets[..., None]).squeeze(2) - probabilities.gather(1, cf_targets)
                )
        return Explanations(**{
            f.name: None if getattr(result, f.name) is None else getattr(result, f.name).detach().cpu()
            for f in dataclasses.fields(Explanations)
        })

    def _build_metric(self, name: str, model: nn.Module, explainer: SoftPullback, classes: int) -> ExplanationMetric:
        """A fresh metric ``name`` on ``model`` with cheap settings scaled to the valid input range.

        Fresh at every log, seeded with ``seed``: the same draws each time, and no state kept.
        ``sync_on_compute=False``: the callback gathers the per-image scores itself.
        """
        assert self._bounds is not None
        low, high = self._bounds
        uniform = (float(low.min()), float(high.max()))
        settings: dict[str, Any] = {
            "random_logit": {"num_classes": classes},
            "infidelity": {"repeats": 1, "uniform_range": uniform},
            "max_sensitivity": {"samples": 2, "radius": 0.01 * float((high - low).mean())},
            "monotonicity_correlation": {"samples": 1, "uniform_range": uniform},
        }.get(name, {})
        cls = METRICS[name]
        if issubclass(cls, ExplainerMetric):
            settings["explainer"] = explainer
        return cls(model, logits_fn=self.logits_fn, seed=self.seed, sync_on_compute=False, **settings)

    # ------------------------------------------------------------------ one log

    def log_explanations(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Explain the probe set and log it at the current step (once per step; the schedule calls this).

        Every rank explains its share and the results are gathered on every rank, so under
        DDP call it from a hook that all ranks run. Rank 0 writes. Failures are handled as
        ``on_error`` says. Works from any hook, also under ``torch.inference_mode``.
        """
        if self._probe is None or self._bounds is None:
            raise RuntimeError("log_explanations needs the set-up done at fit start; call it during trainer.fit.")
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        start = time.perf_counter()
        rank, world_size = trainer.global_rank, trainer.world_size
        payload: tuple[Explanations | None, str | None] = (None, None)
        error: BaseException | None = None
        try:
            model = self._model(pl_module)
            images, labels = self._device_probe(model, rank, world_size)
            if len(images):
                payload = (self.explain(model, images, labels), None)
        except Exception as exc:  # reported below on every rank, so no rank waits alone in a collective
            error = exc
            payload = (None, self._describe(exc))
        shards = self._all_gather(payload, world_size)
        failures = [message for _, message in shards if message is not None]
        if failures:
            self._fail(step, failures[0], error)
            return
        result = merge_shards([shard for shard, _ in shards], world_size)
        drift = None if self._previous is None else correlation(self._previous, result.soft_maps[:, 0])
        self._previous = result.soft_maps[:, 0].clone()
        if not trainer.is_global_zero:
            return
        self.wait()  # rank 0 alone from here on: no collectives below
        try:
            if self.background:
                if self._drawing is None:
                    self._drawing = ThreadPoolExecutor(1, "sp-lightning-drawing", initializer=_drawing_thread_init)
                self._pending = (step, self._drawing.submit(self._draw, trainer, step, result))
            else:
                with one_thread():
                    self._draw(trainer, step, result)
            self._log_scalars(trainer, step, result, drift, time.perf_counter() - start)
        except Exception as exc:
            self._fail(step, self._describe(exc), exc)

    def _fail(self, step: int, message: str, error: BaseException | None) -> None:
        """Raise or warn about a failed log, as ``on_error`` says."""
        message = f"SemanticPullbackCallback failed at step {step}: {message}"
        if self.on_error == "raise":
            raise RuntimeError(message + " (set on_error='warn' to report it and keep training)") from error
        rank_zero_warn(message + " Training continues; the model was restored.")

    @staticmethod
    def _describe(exc: BaseException) -> str:
        frame = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        where = f" (at {os.path.basename(frame.filename)}:{frame.lineno})" if frame is not None else ""
        return f"{type(exc).__name__}: {exc}{where}"

    @staticmethod
    def _all_gather(payload: Any, world_size: int) -> list[Any]:
        """Every rank's payload on every rank (one collective that all ranks reach, also after errors)."""
        if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return [payload]
        gathered: list[Any] = [None] * world_size
        dist.all_gather_object(gathered, payload)
        return gathered

    # ------------------------------------------------------------------ output

    def _name(self, index: int) -> str:
        return self._names[index] if self._names is not None else f"class {index}"

    def _display(self, images: Tensor) -> Tensor:
        """Model inputs -> display images in [0, 1]."""
        if self.denormalize is not None:
            return self.denormalize(images).float().clamp(0.0, 1.0)
        assert self._bounds is not None
        low, high = (b.view(-1, 1, 1) for b in self._bounds)
        return ((images - low) / (high - low)).clamp(0.0, 1.0)

    def _draw(self, trainer: pl.Trainer, step: int, result: Explanations) -> None:
        """Draw the panels of one log and write them (on the drawing thread unless ``background=False``)."""
        self._write(trainer, step, self._render(result))

    def _render(self, result: Explanations) -> dict[str, Tensor]:
        """A labelled panel per probe image and a compact overview grid, keyed by TensorBoard tag.

        The overview shows, for every probe image, the input, the Soft Pullback toward
        the first target (the true label) and the counterfactual toward it.
        """
        assert self._probe is not None
        labels = self._probe.labels
        style = dict(scale=self.color_scale, overlay=self.overlay, opacity=self.opacity,
                     min_size=self.min_image_size, max_size=self.max_image_size)
        panels: dict[str, Tensor] = {}
        summaries: list[Tensor] = []
        for i, image in enumerate(self._probe.images):
            probs, targets = result.probabilities[i], result.targets[i]
            predicted = int(probs.argmax())
            head = f"probe {i}: " + (f"true {self._name(int(labels[i]))} | " if labels is not None else "")
            title = head + f"predicted {self._name(predicted)} ({float(probs[predicted]):.2f})"
            if labels is not None:
                ranks = ["true", *[f"rival {t}" for t in range(1, len(targets))]]
            else:
                ranks = [f"top {t + 1}" for t in range(len(targets))]
            captions = [
                [f"SP: {self._name(int(c))}", f"{r} p={float(probs[c]):.2f}"] for c, r in zip(targets, ranks)
            ]
            maps = result.soft_maps[i]
            if result.gradient_maps is not None:
                maps = torch.cat([maps, result.gradient_maps[i][None]])
                captions.append([f"gradient: {self._name(int(targets[0]))}", captions[0][1]])
            counterfactuals, cf_captions = None, []
            if result.counterfactuals is not None:
                counterfactuals = self._display(result.counterfactuals[i])
                cf_captions = [
                    [f"PA: {self._name(int(c))}", f"logit {float(g):+.2f}"]
                    for c, g in zip(result.counterfactual_targets[i], result.logit_gain[i])
                ]
            input_caption = ["input", f"true: {self._name(int(labels[i]))}" if labels is not None else "no label"]
            shown = self._display(image)
            panels[f"{self.tag}/probe_{i:02d}"] = explanation_panel(
                shown, maps, captions, counterfactuals, cf_captions, title=title, input_caption=input_caption,
                **style,
            )
            summaries.append(explanation_panel(
                shown, maps[:1], captions[:1], None if counterfactuals is None else counterfactuals[:1],
                cf_captions[:1], title=title, input_caption=input_caption, differences=False, **style,
            ))
        panels[f"{self.tag}/overview"] = grid(summaries, ncol=2)
        return panels

    def _write(self, trainer: pl.Trainer, step: int, panels: dict[str, Tensor]) -> None:
        """Images to the TensorBoard logger, else PNG files (with one warning)."""
        tensorboard = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if tensorboard is not None:
            for tag, image in panels.items():
                tensorboard.experiment.add_image(tag, image, global_step=step, dataformats="CHW")
            return
        root = self.png_dir or next(
            (lg.log_dir for lg in trainer.loggers if isinstance(getattr(lg, "log_dir", None), str)),
            trainer.default_root_dir,
        )
        if not self._warned_png:
            self._warned_png = True
            rank_zero_warn(
                f"SemanticPullbackCallback found no TensorBoardLogger; writing its panels as PNG files under {root}. "
                "Add a TensorBoardLogger to watch them as a time-lapse."
            )
        for tag, image in panels.items():
            save_png(image, os.path.join(root, *tag.split("/"), f"step_{step:08d}.png"))

    def _log_scalars(
        self, trainer: pl.Trainer, step: int, result: Explanations, drift: Tensor | None, seconds: float
    ) -> None:
        metrics = {f"{self.tag}/seconds": seconds}
        if result.cosine is not None:
            metrics[f"{self.tag}/cosine_gradient_sp"] = float(result.cosine.mean())
        if drift is not None:
            metrics[f"{self.tag}/drift_correlation"] = float(drift.mean())
        if result.logit_gain is not None and result.probability_gain is not None:
            for column, suffix in ((0, ""), (1, "_runner_up")):
                metrics[f"{self.tag}/counterfactual_logit_gain{suffix}"] = float(result.logit_gain[:, column].mean())
                metrics[f"{self.tag}/counterfactual_probability_gain{suffix}"] = float(
                    result.probability_gain[:, column].mean()
                )
        if result.metric_scores is not None:
            for name, scores in zip(self.metrics, result.metric_scores.T):
                metrics[f"{self.tag}/metrics/{name}"] = float(scores.nanmean())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
