"""What one log of :class:`~sp_lightning.SemanticPullbackCallback` needs to know about its run.

A log explains the probe set at one step and writes the result. From a Trainer it needs
only the step and epoch, this process's rank, the loggers that take the scalars, the
sinks that take the pictures and the directory of the time-lapse files. A
:class:`LogContext` holds exactly these, so the same logging code runs inside
``trainer.fit`` (:func:`trainer_context`) and without any Trainer, e.g. when
``sp-lightning explain`` replays saved checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger

from ..sinks import ImageSink, image_sinks, run_directory


@dataclass(frozen=True)
class LogContext:
    """When and where one log goes.

    Args:
        step: the global step the log shows (its TensorBoard step; one log per step).
        epoch: the epoch written in the pictures' captions.
        loggers: who gets the scalars (``log_metrics(values, step=step)``).
        sinks: called once, on rank 0, when the first log of a run opens its picture sinks.
        run_directory: called once, on rank 0, for the directory that holds the time-lapse files.
        rank: this process's global rank; every rank explains its share of the probe set.
        world_size: how many processes explain together.

    Example:
        >>> context = LogContext(step=120, epoch=2, loggers=(), sinks=list, run_directory=lambda: "runs/replay")
        >>> context.is_global_zero, context.world_size
        (True, 1)
    """

    step: int
    epoch: int
    loggers: Sequence[Logger]
    sinks: Callable[[], list[ImageSink]]
    run_directory: Callable[[], str]
    rank: int = 0
    world_size: int = 1

    @property
    def is_global_zero(self) -> bool:
        """Whether this process writes (global rank 0)."""
        return self.rank == 0


def trainer_context(trainer: pl.Trainer, png_dir: str | None, extra: Sequence[ImageSink]) -> LogContext:
    """The context of a log at ``trainer``'s current step: its loggers' sinks and run directory.

    Args:
        trainer: the running trainer.
        png_dir: the callback's ``png_dir`` (see :func:`~sp_lightning.sinks.image_sinks`).
        extra: the callback's own ``sinks``.
    """
    return LogContext(
        step=trainer.global_step,
        epoch=trainer.current_epoch,
        loggers=tuple(trainer.loggers),
        sinks=lambda: image_sinks(trainer, png_dir, extra=extra),
        run_directory=lambda: run_directory(trainer),
        rank=trainer.global_rank,
        world_size=trainer.world_size,
    )
