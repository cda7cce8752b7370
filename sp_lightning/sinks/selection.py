"""Which sinks a trainer's loggers get, and which directory is the run's own."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from weakref import WeakKeyDictionary

import lightning.pytorch as pl
from lightning.pytorch.loggers import CometLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from .base import ImageSink
from .comet import CometSink
from .files import PngSink
from .mlflow import MlflowSink, local_artifact_dir
from .tensorboard import TensorBoardSink
from .wandb import WandbSink

#: Loggers that show pictures themselves, and the sink that feeds each.
_IMAGE_LOGGERS: tuple[tuple[type[Logger], Callable[..., ImageSink]], ...] = (
    (TensorBoardLogger, TensorBoardSink),
    (WandbLogger, WandbSink),
    (MLFlowLogger, MlflowSink),
    (CometLogger, CometSink),
)
#: Parent of the per-run directories used when no logger has a local run directory.
FALLBACK_DIR = "semantic_pullback_logs"

_fresh_dirs: WeakKeyDictionary[pl.Trainer, str] = WeakKeyDictionary()


def fresh_run_directory(trainer: pl.Trainer) -> str:
    """``<default_root_dir>/semantic_pullback_logs/version_N``: a new N for a new trainer, then the same.

    Args:
        trainer: the run's trainer; N is one more than the highest version already there, and the
            directory is created at once so a concurrent run cannot claim it too.
    """
    if trainer not in _fresh_dirs:
        root = os.path.abspath(os.path.join(trainer.default_root_dir, FALLBACK_DIR))
        os.makedirs(root, exist_ok=True)
        taken = [int(m.group(1)) for name in os.listdir(root) if (m := re.fullmatch(r"version_(\d+)", name))]
        version = max(taken, default=-1) + 1
        while True:
            try:
                os.makedirs(os.path.join(root, f"version_{version}"))
                break
            except FileExistsError:
                version += 1
        _fresh_dirs[trainer] = os.path.join(root, f"version_{version}")
    return _fresh_dirs[trainer]


def logger_run_directory(logger: Logger) -> str | None:
    """A logger's own local directory for this run, or None when it keeps none on this machine.

    TensorBoard, CSV and any logger with a ``log_dir``: that; W&B: the run's ``files`` directory;
    MLflow: the run's artifact directory when the store is local; Comet: none (offline, a run is
    one archive written at its end); other loggers:
    ``save_dir/name/version`` (Lightning's layout) when all three are known.

    Args:
        logger: one of the trainer's loggers (reading it may start its run).
    """
    if isinstance(logger, WandbLogger):
        return os.path.abspath(logger.experiment.dir)
    if isinstance(logger, MLFlowLogger):
        return local_artifact_dir(logger)
    if isinstance(logger, CometLogger):
        return None
    log_dir = getattr(logger, "log_dir", None)
    if isinstance(log_dir, str):
        return os.path.abspath(log_dir)
    if logger.save_dir is None or logger.name is None or logger.version is None:
        return None
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return os.path.abspath(os.path.join(logger.save_dir, str(logger.name), version))


def run_directory(trainer: pl.Trainer) -> str:
    """The run's own directory for the callback's time-lapse files.

    The first logger's local run directory (see :func:`logger_run_directory`), else the
    trainer's :func:`fresh_run_directory`.

    Args:
        trainer: the run's trainer, on global rank 0 (other ranks have no run directory: RuntimeError).
    """
    if trainer.global_rank != 0:
        raise RuntimeError(
            f"run_directory is for global rank 0 only (it draws the pictures), not rank {trainer.global_rank}."
        )
    for logger in trainer.loggers:
        directory = logger_run_directory(logger)
        if directory is not None:
            return directory
    return fresh_run_directory(trainer)


def image_sinks(trainer: pl.Trainer, png_dir: str | None = None, extra: Sequence[ImageSink] = ()) -> list[ImageSink]:
    """One sink per logger of ``trainer`` that shows pictures, else PNG files, then ``extra``.

    TensorBoard, W&B, MLflow and Comet loggers get their own sink. When none of the loggers
    shows pictures, every other logger gets PNG files under its own run directory (so two runs
    never share files); a logger without one, or no logger at all, gets them under the
    trainer's :func:`fresh_run_directory`. With ``png_dir``, the PNG files of the loggers that
    do not show pictures go there, also beside those that do. When nothing but PNG files would
    be written (and ``png_dir`` was not chosen), one warning says where.

    Args:
        trainer: the run's trainer. Only global rank 0 draws: other ranks get an empty list.
        png_dir: one directory for all PNG files instead of the loggers' own (unused when every
            logger shows images; not versioned, so give each run its own).
        extra: the user's own sinks, appended as they are.

    Returns:
        The loggers' own sinks (in the order of ``trainer.loggers``), the PNG sinks, then ``extra``.
    """
    bad = [sink for sink in extra if not isinstance(sink, ImageSink)]
    if bad:
        raise TypeError(f"Every extra sink must subclass sp_lightning.sinks.ImageSink, got {type(bad[0]).__name__}.")
    if trainer.global_rank != 0:
        return []
    sinks: list[ImageSink] = []
    png_dirs: list[str] = []
    plain: list[str] = []
    for logger in trainer.loggers:
        make = next((make for kind, make in _IMAGE_LOGGERS if isinstance(logger, kind)), None)
        if make is not None:
            sinks.append(make(logger))
            continue
        plain.append(type(logger).__name__)
        directory = png_dir or logger_run_directory(logger) or fresh_run_directory(trainer)
        png_dirs.append(os.path.abspath(directory))
    if not trainer.loggers:
        png_dirs.append(os.path.abspath(png_dir or fresh_run_directory(trainer)))
    if sinks and png_dir is None:
        png_dirs = []  # a logger shows the pictures: PNG copies for the others would only cost time
    unique = list(dict.fromkeys(png_dirs))
    if not sinks and not extra and png_dir is None:
        loggers = ", ".join(plain) if plain else "none (logger=False)"
        rank_zero_warn(
            f"No logger of this run shows images (loggers: {loggers}); the explanation pictures are written as "
            f"PNG files under {', '.join(unique)}. Add a TensorBoardLogger, WandbLogger, MLFlowLogger or "
            "CometLogger to see them in a dashboard, or pass png_dir=... to choose the folder."
        )
    return sinks + [PngSink(directory) for directory in unique] + list(extra)
