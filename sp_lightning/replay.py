"""``sp-lightning explain``: what :class:`~sp_lightning.SemanticPullbackCallback` would have logged, for saved checkpoints.

A finished run (trained with or without the callback) is explained after the fact: every
checkpoint that the given patterns match, in global-step order, gets the callback's panels,
scalars and time-lapse frames at its own global step, written as TensorBoard events (and
GIF time-lapse files under ``<out>/<tag>/timelapse``) in one output directory. The work is
the callback's own: :meth:`~sp_lightning.SemanticPullbackCallback.choose_probe`,
:meth:`~sp_lightning.SemanticPullbackCallback.prepare` and
:meth:`~sp_lightning.SemanticPullbackCallback.log_step` driven without a Trainer, so the
pictures and numbers are those a training run with the callback shows.

Example::

    sp-lightning explain --config configs/tiny.yaml \\
        --ckpt_path 'lightning_logs/version_0/checkpoints/*.ckpt' --out explained --callback.top_k 2
    sp-lightning tensorboard explained
"""

from __future__ import annotations

import copy
import glob
import importlib
import os
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import mock

import lightning.pytorch as pl
import torch
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from tqdm.auto import tqdm

from .callbacks import SemanticPullbackCallback
from .callbacks.context import LogContext
from .probe.selection import ProbeSet, isolated_rng
from .run_config import config_arguments
from .sinks import ImageSink, PngSink, TensorBoardSink

#: Callback options the replay does not take: the schedule (the checkpoints are the schedule) and
#: the probe images, which come from ``--images``.
NOT_REPLAYED = ("every_n_epochs", "every_n_steps", "log_at_fit_start", "images", "labels")


class ExplainError(ValueError):
    """Bad input to ``sp-lightning explain``; the message names the problem and the fix."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint file to explain and the step and epoch it was saved at."""

    path: str
    step: int
    epoch: int


def read_checkpoint(path: str) -> dict[str, Any]:
    """A Lightning checkpoint, its tensors memory-mapped (reading only its step costs little).

    Checkpoints are unpickled in full (``weights_only=False``), as Lightning itself loads them to
    resume: they hold hyperparameters and loop state besides tensors. Explain only files you trust.

    Args:
        path: the ``.ckpt`` file.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:
        raise ExplainError(f"Cannot read the checkpoint {path}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(checkpoint, Mapping) or "state_dict" not in checkpoint or "global_step" not in checkpoint:
        raise ExplainError(
            f"{path} is not a Lightning checkpoint (it has no 'state_dict' and 'global_step'); give the files that "
            "ModelCheckpoint or trainer.save_checkpoint wrote."
        )
    return dict(checkpoint)


def _listed(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def check_weights(path: str, weights: Mapping[str, Any], module: torch.nn.Module) -> None:
    """Raise a clear error unless ``weights`` fit ``module`` exactly (the same keys and shapes).

    Args:
        path: the checkpoint the weights come from (named in the error).
        weights: its ``state_dict``.
        module: the model built from the config.
    """
    expected = module.state_dict()
    missing = [key for key in expected if key not in weights]
    unexpected = [key for key in weights if key not in expected]
    reshaped = [
        f"{key} {tuple(weights[key].shape)} in the file, {tuple(value.shape)} in the model"
        for key, value in expected.items()
        if key in weights and isinstance(weights[key], Tensor) and weights[key].shape != value.shape
    ]
    problems = [
        f"{what}: {_listed(keys)}"
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("other shapes", reshaped))
        if keys
    ]
    if problems:
        raise ExplainError(
            f"{path} is a checkpoint of another model than the config's {type(module).__name__} "
            f"({'; '.join(problems)}). Pass the --config the run was trained with."
        )


def find_checkpoints(patterns: Sequence[str], module: torch.nn.Module) -> list[Checkpoint]:
    """Every checkpoint file ``patterns`` match, checked against ``module``, in global-step order, one per step.

    Args:
        patterns: file names or glob patterns (``**`` matches directories recursively).
        module: the model built from the config; each file's weights must fit it.
    """
    paths = sorted({path for pattern in patterns for path in glob.glob(os.path.expanduser(pattern), recursive=True)
                    if os.path.isfile(path)})
    if not paths:
        raise ExplainError(
            f"No checkpoint file matches {' '.join(patterns)}. Give the run's checkpoints, e.g. --ckpt_path "
            "'lightning_logs/version_0/checkpoints/*.ckpt' (quoted, so that the shell passes the pattern on)."
        )
    found = []
    for path in paths:
        checkpoint = read_checkpoint(path)
        check_weights(path, checkpoint["state_dict"], module)
        found.append(Checkpoint(path, int(checkpoint["global_step"]), int(checkpoint.get("epoch", 0))))
    found.sort(key=lambda c: (c.step, c.path))
    unique = [c for i, c in enumerate(found) if i == 0 or c.step != found[i - 1].step]
    skipped = [c for c in found if c not in unique]
    if skipped:
        warnings.warn(
            "sp-lightning explain: one checkpoint per global step is explained; skipping "
            + ", ".join(f"{os.path.basename(c.path)} (step {c.step})" for c in skipped)
            + ", saved at the same step as another file.",
            stacklevel=2,
        )
    return unique


def validation_loader_of(datamodule: pl.LightningDataModule | None, module: pl.LightningModule) -> Any:
    """The first validation dataloader of the run's data, set up for fitting as ``trainer.fit`` does.

    Args:
        datamodule: the config's data, or ``None`` to ask ``module.val_dataloader()``.
        module: the LightningModule (its own ``val_dataloader`` when there is no datamodule).
    """
    source: Any = datamodule if datamodule is not None else module
    fix = (
        "The probe images are picked from the validation data, as the callback picks them: give the config's "
        "data a validation split, or pass --images PATH (a torch.save file of (N, C, H, W) images, or of a dict "
        "with 'images' and 'labels')."
    )
    try:
        if datamodule is not None:
            datamodule.prepare_data()
            datamodule.setup("fit")
        with isolated_rng():
            loaders = source.val_dataloader()
    except Exception as exc:
        raise ExplainError(f"{type(source).__name__} gives no validation data ({type(exc).__name__}: {exc}). {fix}") from exc
    if isinstance(loaders, Mapping):
        loaders = next(iter(loaders.values()), None)
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    if loaders is None:
        raise ExplainError(f"{type(source).__name__} gives no validation data. {fix}")
    return loaders


def refuse_old_events(out: str) -> None:
    """Raise if ``out`` already holds TensorBoard events: a second replay there would show every step twice."""
    if glob.glob(os.path.join(out, "events.out.tfevents.*")):
        raise ExplainError(
            f"{out} already holds TensorBoard events (an earlier replay?); TensorBoard would show each step twice. "
            "Choose another --out, or delete the old files first."
        )


def explain_checkpoints(
    module: pl.LightningModule,
    checkpoints: Sequence[str],
    out: str,
    callback: SemanticPullbackCallback,
    datamodule: pl.LightningDataModule | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> ProbeSet:
    """Log what ``callback`` would have logged at each checkpoint's global step, into ``out``; the probe set used.

    The probe set is ``callback``'s ``images=``, else the one a checkpoint of a run trained with
    the callback saved (the earliest checkpoint's), else picked from the validation data with the
    callback's seed: the images the callback picks during training.

    Args:
        module: the run's LightningModule (left as it is: each checkpoint's weights are loaded
            strictly into a copy of it, on ``device``).
        checkpoints: checkpoint files or glob patterns.
        out: directory of the TensorBoard events and the time-lapse files (``<out>/<tag>/timelapse``).
        callback: its options are the replay's (its schedule options are not used).
        datamodule: the run's data: validation images, ``mean``/``std`` and class names.
        device: where the model is explained.
        progress: show a progress bar (on stderr).
    """
    found = find_checkpoints(checkpoints, module)
    out = os.path.abspath(out)
    refuse_old_events(out)
    saved = read_checkpoint(found[0].path).get("callbacks", {}).get(callback.state_key)
    if isinstance(saved, Mapping) and saved.get("images") is not None:
        callback.load_state_dict({key: saved.get(key) for key in ("images", "labels", "indices")})
    probe = callback.choose_probe(lambda: validation_loader_of(datamodule, module))
    model = copy.deepcopy(module).to(device)
    logger = TensorBoardLogger(out, name="", version="", default_hp_metric=False)

    def sinks() -> list[ImageSink]:
        files = [PngSink(callback.png_dir)] if callback.png_dir is not None else []
        return [TensorBoardSink(logger), *files, *callback.sinks]

    try:
        bar = tqdm(found, desc="sp-lightning explain", unit="checkpoint", disable=not progress)
        for index, checkpoint in enumerate(bar):
            model.load_state_dict(read_checkpoint(checkpoint.path)["state_dict"], strict=True)
            if index == 0:
                callback.prepare(model, probe, datamodule)
            context = LogContext(checkpoint.step, checkpoint.epoch, (logger,), sinks, lambda: out)
            callback.log_step(model, context)
    finally:
        callback.close()
        logger.finalize("success")
    return probe


def build_parser() -> ArgumentParser:
    """The command line of ``sp-lightning explain``: its own arguments and the callback's options under ``--callback``."""
    parser = ArgumentParser(
        prog="sp-lightning explain",
        description=(
            "Explain saved checkpoints as SemanticPullbackCallback would have during training: panels, scalars and "
            "time-lapse files at each checkpoint's global step, as TensorBoard events in --out. The callback's "
            "options default to those of a SemanticPullbackCallback in the config's trainer.callbacks."
        ),
    )
    parser.add_argument("--config", action="append", required=True,
                        help="the training config (what `sp-lightning fit` took); repeat to combine several")
    parser.add_argument("--ckpt_path", nargs="+", required=True,
                        help="checkpoint files or glob patterns (quote them), explained in global-step order")
    parser.add_argument("--out", required=True, help="output directory for the TensorBoard events and time-lapse files")
    parser.add_argument("--images", type=str | None, default=None,
                        help="probe images: a torch.save file of (N, C, H, W) images or of a dict with 'images' and "
                        "'labels' (default: picked from the validation data as the callback picks them)")
    parser.add_argument("--device", default="auto", help="where to explain: cpu, cuda, cuda:1... (auto: cuda if available)")
    parser.add_argument("--progress", type=bool, default=True, help="show a progress bar")
    parser.add_class_arguments(SemanticPullbackCallback, "callback", skip=set(NOT_REPLAYED), instantiate=False)
    return parser


def configured_callback(config: Namespace) -> dict[str, Any]:
    """The init arguments of the first :class:`SemanticPullbackCallback` in a parsed run config's ``trainer.callbacks``."""
    entries = config.get("trainer.callbacks") or []
    for entry in entries if isinstance(entries, list) else [entries]:
        if not isinstance(entry, Namespace) or not isinstance(entry.get("class_path"), str):
            continue
        module_name, _, name = entry.class_path.rpartition(".")
        cls = getattr(importlib.import_module(module_name), name, None)
        if isinstance(cls, type) and issubclass(cls, SemanticPullbackCallback):
            init = entry.get("init_args")
            return dict(init.items()) if isinstance(init, Namespace) else {}
    return {}


def make_callback(images: str | None, labels: Any, options: dict[str, Any]) -> SemanticPullbackCallback:
    """The replay's callback; its own checks of the options (e.g. ``top_k=0``, a missing images file) as ExplainError."""
    try:
        return SemanticPullbackCallback(images=images, labels=labels, **options)
    except (ValueError, TypeError, OSError) as error:
        raise ExplainError(f"{error} (see --help for the --callback options and --images)") from error


def run_explain(argv: Sequence[str], run_cli: Callable[..., Any]) -> int:
    """``sp-lightning explain ARGS``: 0 when done, 2 (with the reason on stderr) for bad input.

    Args:
        argv: the arguments after ``explain``.
        run_cli: :func:`sp_lightning.cli.run_cli`, which builds the run's model and data from its config.
    """
    parser = build_parser()
    args = parser.parse_args(list(argv))
    # the run's model and data, built on this machine's CPU whatever hardware the run used
    overrides = ["--trainer.logger=false", "--trainer.accelerator=cpu", "--trainer.devices=1",
                 "--trainer.strategy=auto", "--trainer.num_nodes=1", "--trainer.precision=32-true"]
    try:
        configs = config_arguments(args.config)  # a run's saved config.yaml works too
    except FileNotFoundError as error:
        print(f"sp-lightning explain: error: {error}", file=sys.stderr)
        return 2
    with mock.patch.object(sys, "argv", sys.argv[:1]):  # else LightningCLI warns that ours are not its arguments
        run = run_cli(configs + overrides, run=False)
    configured = configured_callback(run.config)
    defaults = {f"callback.{k}": v for k, v in configured.items() if k not in NOT_REPLAYED}
    if defaults:
        parser.set_defaults(defaults)
        args = parser.parse_args(list(argv))
    options = dict(parser.instantiate(args).callback.items())
    images = args.images if args.images is not None else configured.get("images")
    labels = configured.get("labels") if args.images is None else None
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    try:
        callback = make_callback(images, labels, options)
        explain_checkpoints(run.model, args.ckpt_path, args.out, callback, run.datamodule, device, args.progress)
    except ExplainError as error:
        print(f"sp-lightning explain: error: {error}", file=sys.stderr)
        return 2
    return 0
