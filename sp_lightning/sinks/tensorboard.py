"""Pictures into a TensorBoardLogger's event file (its Images tab has a step slider)."""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor

from .base import ImageSink, check_images


class TensorBoardSink(ImageSink):
    """Adds each picture to the logger's ``SummaryWriter`` under its tag at the given step.

    Args:
        logger: the run's TensorBoard logger; its writer is taken now, on the main thread.
    """

    def __init__(self, logger: TensorBoardLogger) -> None:
        self._writer = logger.experiment

    def log_images(self, images: Mapping[str, Tensor], step: int, caption: str) -> None:
        check_images(images)
        for tag, image in images.items():
            self._writer.add_image(tag, image, global_step=step, dataformats="CHW")

    def close(self) -> None:
        self._writer.flush()
