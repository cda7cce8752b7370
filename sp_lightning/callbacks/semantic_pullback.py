"""``SemanticPullbackCallback``: watch Soft Pullbacks and counterfactuals evolve while a classifier trains.

A thin orchestrator of hooks and state. The work is done elsewhere:
:mod:`sp_lightning.probe` picks the probe set, resolves the input space and computes
the explanations (a pure function); :mod:`sp_lightning.display` draws them;
:mod:`sp_lightning.sinks` hands them to each logger; :mod:`.writer` runs the drawing
off the training thread on an immutable snapshot.
"""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from collections.abc import Callable
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ..distributed import explained_module, gather_objects, refuse_deepspeed
from ..display.panels import Frame, PanelStyle
from ..display.timelapse import TimeLapse
from ..explainers import equivalent_alpha
from ..engine import LogitsFn, SoftRules
from ..probe.explain import (
    ExplainSettings, Explanations, Reduction, check_model, correlation, explain_probe, merge_shards, scalars,
    warn_if_not_finite,
)
from ..probe.input_space import InputSpace, resolve_input_space
from ..probe.selection import BatchFn, ProbeSet, read_probe, resumed_probe, select_probe, validate_probe, validation_loader
from ..sinks import ImageSink
from .arguments import validate_arguments
from .context import LogContext, trainer_context
from .writer import PanelWriter

OnError = Literal["raise", "warn"]


class SemanticPullbackCallback(Callback):
    """Log Soft Pullbacks, counterfactuals and the gradient of a few fixed images while a classifier trains.

    ``L.Trainer(callbacks=[SemanticPullbackCallback()])`` works with no arguments on any
    LightningModule whose forward maps a batch of images to logits. Pictures go to every
    logger that takes images (TensorBoard, W&B, MLflow), PNG files under the run directory
    of any other, and animated time-lapse files into the run's own log directory. Under DDP
    every rank explains (and scores) its share of the probe images and rank 0 writes.

    Args:
        num_images: how many probe images to take from the validation dataloader (seeded,
            class-balanced where labels exist, stored in checkpoints).
        images: your own probe images (N, C, H, W) instead, or a path to a ``torch.save`` file
            holding that tensor or a dict with ``"images"`` (and ``"labels"``). All are used.
        labels: class indices (N,) for ``images`` (optional).
        batch_fn: maps a validation batch to ``(images, labels or None)``; default: the first
            element of a tuple/list (and the second if it holds class indices or one-hot rows),
            or dict keys such as ``"image"``/``"label"``. In YAML, a dotted import path.
        seed: seed of the callback's own generator for picking probe images and metric noise.
        every_n_epochs: log at the end of every n-th training epoch (``None``: never).
        every_n_steps: log every n optimizer steps (``None``: never).
        log_at_fit_start: log a baseline when training starts (step 0, or the resume step
            unless it was logged before the checkpoint), never during the sanity check.
        top_k: Soft Pullbacks toward the true label and the k highest-scoring other classes
            (without labels: the k top predicted classes).
        gradient: also compute the plain gradient (a panel tile and the cosine scalar).
        counterfactual: run Pullback Ascent toward the true label and the runner-up (without
            labels: the top two predicted classes), clipped every step to the valid input range.
        ascent_steps: Pullback Ascent iterations.
        ascent_alpha: ascent step length; ``None`` keeps the paper's per-element step for this
            input size and range (:func:`~sp_lightning.equivalent_alpha`).
        temperatures: soft-rule temperatures (rule name -> value, ``None`` = rule off).
        model_attr: explain ``getattr(pl_module, model_attr)`` instead of the module itself.
        logits_fn: maps the model output to (B, num_classes) logits (dotted path in YAML).
        metrics: names of :mod:`sp_lightning.metrics` to log at every log as probe-set means
            under ``<tag>/metrics/<name>``, scoring the Soft Pullback toward the first target:
            ``random_logit``, ``faithfulness_correlation``, ``faithfulness_estimate``,
            ``infidelity``, ``max_sensitivity``, ``monotonicity_correlation`` (cheap settings,
            seeded with ``seed``, the same draws at every log).
        explainers: other explainers, name -> a callable ``(model, inputs, target) -> attribution``
            (``target`` a LongTensor (B,)), a Captum ``Attribution`` built on the explained model, or
            an sp_lightning explainer; each map toward the first target is an extra tile after the
            gradient, drawn like the Soft Pullback. Coarser maps (Grad-CAM) are upsampled to the input.
        reduction: channel reduction of heatmaps: ``mean``, ``sum``, ``abs_mean``, ``l2``.
        color_scale: fixed heatmap scale (values at +-color_scale are full colour), so brightness
            is comparable across images and steps; ``None`` scales each map by the 99th
            percentile of its absolute values (each tile's legend says the value).
        overlay: draw heatmaps over a faint grey copy of the input (else on white).
        opacity: how much the heatmap's colour hides the input: 1 is the plain map on white,
            0.8 keeps 20% of the input's contrast under the colour.
        min_image_size: tiles smaller than this many pixels are enlarged.
        max_image_size: tiles larger than this many pixels are shrunk.
        mean: per-channel normalisation mean of the inputs (with ``std``), to show images as a
            person sees them and to clip counterfactuals; else the datamodule's ``mean``.
        std: per-channel normalisation std (with ``mean``); else the datamodule's ``std``.
        denormalize: maps model inputs to display images in [0, 1] (overrides mean/std for display).
        input_bounds: ``(low, high)`` valid model-input range (numbers or per channel); default
            ``(-mean/std, (1-mean)/std)``, else [0, 1] when the probe images lie in it, else the
            probe set's per-channel range (with a warning).
        class_names: names for the class indices; else the datamodule's ``class_names`` or ``classes``.
        tag: prefix of every image and scalar tag.
        png_dir: write PNG files here instead of to the loggers' own image stores.
        sinks: your own :class:`~sp_lightning.sinks.ImageSink` objects, given every log's pictures
            besides the loggers' sinks.
        timelapse: keep an animated time-lapse file per probe image and one for the overview in
            the run's log directory, rewritten after every log.
        on_error: ``"warn"`` reports a failed log and lets training continue; ``"raise"`` stops
            training. The model is restored either way.
        background: draw and write the pictures on a background thread at the lowest CPU priority
            (explanations always run on the training thread, between steps); at most one log is
            pending. ``False``: draw inline.

    Probe images given with ``images=`` (or a new ``num_images``) on resuming from a checkpoint
    replace the checkpoint's probe set, with a warning that the time-lapse starts again.
    Under FSDP2 (``ModelParallelStrategy``) and FSDP1 (``FSDPStrategy``) every rank explains an
    equal-sized (padded) share in lockstep, since each forward gathers parameters from all ranks.
    DeepSpeed is refused at fit start. With ``WeightAveraging``/``EMAWeightAveraging`` the live
    weights are explained (the ones training updates), not the average.

    Example:
        >>> import lightning as L
        >>> from sp_lightning import SemanticPullbackCallback
        >>> trainer = L.Trainer(callbacks=[SemanticPullbackCallback(num_images=4)], max_epochs=1)
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
        explainers: dict[str, Any] | None = None,
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
        sinks: list[ImageSink] | None = None,
        timelapse: bool = True,
        on_error: OnError = "warn",
        background: bool = True,
    ) -> None:
        super().__init__()
        validate_arguments(locals())
        self.num_images, self.seed, self.batch_fn = num_images, int(seed), batch_fn
        self.every_n_epochs, self.every_n_steps, self.log_at_fit_start = every_n_epochs, every_n_steps, log_at_fit_start
        self.top_k, self.gradient, self.counterfactual = top_k, gradient, counterfactual
        self.ascent_steps, self.ascent_alpha = ascent_steps, ascent_alpha
        self.rules = SoftRules.create(temperatures)
        self.model_attr, self.logits_fn = model_attr, logits_fn
        self.metrics = list(metrics or [])
        self.explainers = dict(explainers or {})
        self.reduction = reduction
        self.style = PanelStyle(color_scale, overlay, opacity, min_image_size, max_image_size)
        self.mean, self.std, self.denormalize, self.input_bounds = mean, std, denormalize, input_bounds
        self.class_names = list(class_names) if class_names is not None else None
        self.tag, self.png_dir, self.sinks, self.timelapse = tag, png_dir, list(sinks or []), bool(timelapse)
        self.on_error, self.background = on_error, bool(background)
        self._user_probe = read_probe(images, labels)
        self._saved_probe: ProbeSet | None = None  # from a checkpoint, until fit start decides
        self._probe: ProbeSet | None = None
        self._previous: Tensor | None = None
        self._last_step: int | None = None
        self._writer: PanelWriter | None = None  # rank 0's, from the first log until teardown
        # resolved at fit start
        self._space: InputSpace | None = None
        self._settings: ExplainSettings | None = None
        self._shown: Tensor | None = None  # the probe images in display space

    # ------------------------------------------------------------------ state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(tag=self.tag)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The probe set and what drift needs, so a resumed run explains the same images."""
        probe = self._probe or self._saved_probe
        return {
            "images": None if probe is None else probe.images,
            "labels": None if probe is None else probe.labels,
            "indices": None if probe is None else probe.indices,
            "previous": self._previous,
            "last_step": self._last_step,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("images") is not None:
            validate_probe(state_dict["images"], state_dict.get("labels"))
            self._saved_probe = ProbeSet(state_dict["images"], state_dict.get("labels"), state_dict.get("indices"))
        self._previous = state_dict.get("previous")
        self._last_step = state_dict.get("last_step")

    @property
    def probe(self) -> ProbeSet | None:
        """The probe images (and labels) in use; ``None`` before fit start."""
        return self._probe

    # ------------------------------------------------------------------ hooks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build and check everything, so problems surface before any training step."""
        refuse_deepspeed(trainer, type(self).__name__)
        if self._probe is None:
            self._probe = self.choose_probe(
                lambda: validation_loader(trainer), share=lambda probe: trainer.strategy.broadcast(probe, src=0)
            )
        self.prepare(pl_module, self._probe, trainer.datamodule)

    def prepare(self, pl_module: pl.LightningModule, probe: ProbeSet, datamodule: Any = None) -> None:
        """Resolve the input space and explanation settings for ``probe`` and check the model on it (fit start's work).

        Args:
            pl_module: the module whose model (see ``model_attr``) is explained.
            probe: the probe set to explain from now on.
            datamodule: where ``mean``/``std`` and class names are read from when not given.
        """
        model = self._model(pl_module)
        self._probe = probe
        self._space = resolve_input_space(
            probe.images, datamodule, mean=self.mean, std=self.std, input_bounds=self.input_bounds,
            denormalize=self.denormalize, class_names=self.class_names,
        )
        alpha = self.ascent_alpha or equivalent_alpha(probe.images.shape[1:], range_width=self._space.width)
        self._settings = ExplainSettings(
            top_k=self.top_k, gradient=self.gradient, counterfactual=self.counterfactual,
            ascent_steps=self.ascent_steps, alpha=alpha, bounds=self._space.bounds, rules=self.rules,
            logits_fn=self.logits_fn, reduction=self.reduction, metrics=tuple(self.metrics), seed=self.seed,
            explainers=tuple(self.explainers.items()),
        )
        self._shown = self._space.to_display(probe.images)
        images, labels = probe.shard(model)
        check_model(model, images, labels, self.top_k, self.logits_fn, self._space.class_names)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The baseline: after the sanity check and after a resumed run's step counter is restored."""
        if self.log_at_fit_start:
            self.log_explanations(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0:
            self.log_explanations(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs is not None and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.log_explanations(trainer, pl_module)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wait()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Training already failed: finish the pending images, but only warn about their own failure."""
        try:
            self.close()
        except Exception as error:  # on_error="raise" must not hide the exception that stopped training
            rank_zero_warn(str(error))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Finish pending images (e.g. from ``log_explanations`` under ``trainer.validate``)."""
        self.close()

    def wait(self) -> None:
        """Block until the last log's images are written; report their failure as ``on_error`` says."""
        failure = self._writer.wait() if self._writer is not None else None
        if failure is not None:
            self._fail(failure[0], self._describe(failure[1]), failure[1])

    def close(self) -> None:
        """Write the pending images, end the drawing thread and close the sinks (the next log starts a new writer)."""
        writer, self._writer = self._writer, None
        failure = writer.close() if writer is not None else None
        if failure is not None:
            self._fail(failure[0], self._describe(failure[1]), failure[1])

    # ------------------------------------------------------------------ set-up

    def _model(self, pl_module: pl.LightningModule) -> nn.Module:
        """The module to explain: the LightningModule itself (never a DDP wrapper) or one of its attributes
        (through FSDP1's root wrapper, compiled modules eagerly: ``explained_module``)."""
        if self.model_attr is None:
            return explained_module(pl_module, pl_module)
        model = getattr(pl_module, self.model_attr, None)
        if not isinstance(model, nn.Module):
            raise AttributeError(
                f"model_attr={self.model_attr!r}: {type(pl_module).__name__} has no nn.Module attribute of that name."
            )
        return explained_module(pl_module, model)

    def choose_probe(
        self, find_loader: Callable[[], Any], share: Callable[[ProbeSet], ProbeSet] = lambda probe: probe
    ) -> ProbeSet:
        """The user's images, the checkpoint's, or a fresh selection from the validation data (see ``resumed_probe``).

        Args:
            find_loader: returns the validation dataloader to select from (``None``: there is none);
                called only when a fresh selection is needed.
            share: hands a fresh selection to every process (rank 0's wins).
        """
        probe, change = resumed_probe(self._saved_probe, self._user_probe, self.num_images)
        self._saved_probe = None
        if change is not None:
            rank_zero_warn(
                f"SemanticPullbackCallback: {change}; explaining the new probe set, so the time-lapse and the drift "
                "correlation start again. Leave images/num_images as they were to keep the saved probe set."
            )
            self._previous = None
        if probe is not None:
            return probe
        loader = find_loader()
        if loader is None:
            raise RuntimeError(
                "SemanticPullbackCallback needs probe images: give the Trainer validation data "
                "(val_dataloaders=... or a val_dataloader() method) or pass images=... to the callback."
            )
        probe = select_probe(loader, self.num_images, self.seed, self.batch_fn)
        # every rank should explain the same images, even if its data differs (e.g. per-rank transforms)
        return share(probe)

    # ------------------------------------------------------------------ one log

    def explain(self, model: nn.Module, images: Tensor, labels: Tensor | None) -> Explanations:
        """All explanations for ``images`` (on the model's device) with this callback's settings."""
        if self._settings is None:
            raise RuntimeError("explain needs the set-up done at fit start; call it during trainer.fit.")
        return explain_probe(model, images, labels, self._settings)

    def log_explanations(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Explain the probe set and log it at the current step (once per step; the schedule calls this).

        Every rank explains its share and the results are gathered on every rank, so under
        DDP call it from a hook that all ranks run. Rank 0 writes. Failures are handled as
        ``on_error`` says. Works from any hook, also under ``torch.inference_mode``.
        """
        self._check_set_up("log_explanations")
        self.log_step(pl_module, trainer_context(trainer, self.png_dir, self.sinks))

    def _check_set_up(self, caller: str) -> None:
        if self._probe is None or self._settings is None:
            raise RuntimeError(f"{caller} needs the set-up done at fit start; call it during trainer.fit (or prepare).")

    def log_step(self, pl_module: pl.LightningModule, context: LogContext) -> None:
        """:meth:`log_explanations` without a Trainer: explain and log at ``context.step`` (after :meth:`prepare`).

        Args:
            pl_module: the module whose model (see ``model_attr``) is explained.
            context: the step, epoch, rank, loggers, sinks and run directory of this log.
        """
        self._check_set_up("log_step")
        assert self._probe is not None
        step = context.step
        if step == self._last_step:
            return
        self._last_step = step
        start = time.perf_counter()
        rank, world_size = context.rank, context.world_size
        payload: tuple[Explanations | None, str | None] = (None, None)
        error: BaseException | None = None
        try:
            model = self._model(pl_module)
            images, labels = self._probe.shard(model, rank, world_size)  # equal sizes: FSDP runs in lockstep
            payload = (self.explain(model, images, labels), None)
        except Exception as exc:  # reported below on every rank, so no rank waits alone in a collective
            error = exc
            payload = (None, self._describe(exc))
        shards = gather_objects(payload, world_size)
        failures = [message for _, message in shards if message is not None]
        if failures:
            self._fail(step, failures[0], error)
            return
        result = merge_shards([shard for shard, _ in shards], world_size, len(self._probe.images))
        drift = None if self._previous is None else correlation(self._previous, result.soft_maps[:, 0])
        self._previous = result.soft_maps[:, 0].clone()
        if not context.is_global_zero:
            return
        self.wait()  # rank 0 alone from here on: no collectives below
        try:
            warn_if_not_finite(result, step)
            self._writer_for(context).write(self._frame(context, result))
            values = {f"{self.tag}/seconds": time.perf_counter() - start, **scalars(result, self.tag, self.metrics, drift)}
            for logger in context.loggers:
                logger.log_metrics(values, step=step)
        except Exception as exc:
            self._fail(step, self._describe(exc), exc)

    def _frame(self, context: LogContext, result: Explanations) -> Frame:
        """The immutable snapshot the drawing thread gets: display-space images and this log's explanations."""
        assert self._probe is not None and self._space is not None and self._shown is not None
        if result.counterfactuals is not None:
            result = dataclasses.replace(result, counterfactuals=self._space.to_display(result.counterfactuals))
        labels = self._probe.labels
        return Frame(
            tag=self.tag, step=context.step, epoch=context.epoch, images=self._shown,
            labels=None if labels is None else labels.clone(), class_names=self._space.class_names,
            explanations=result, style=self.style, explainer_names=tuple(self.explainers),
        )

    def _writer_for(self, context: LogContext) -> PanelWriter:
        if self._writer is None:
            timelapse = TimeLapse(os.path.join(context.run_directory(), self.tag, "timelapse")) if self.timelapse else None
            self._writer = PanelWriter(context.sinks(), timelapse, self.background)
        return self._writer

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
