"""Pictures into a Weights & Biases run (media files inside the run's ``files`` directory)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from ..display.layout import to_pil
from .base import ImageSink, check_images

#: The step key WandbLogger logs with every metric and plots everything against.
STEP_KEY = "trainer/global_step"


class WandbSink(ImageSink):
    """Logs one history row per step: every tag as a ``wandb.Image`` with the caption, plus ``trainer/global_step``.

    The step goes in as the ``trainer/global_step`` value, never as wandb's own ``step=``
    argument, which must only grow: the drawing thread logs a step after the training loop
    has logged later ones, and wandb would drop such rows.

    A time-lapse is kept as a live-synced file of the run (re-uploaded whenever it changes); at
    :meth:`close` each GIF is also logged once as video media so the workspace shows it.

    Args:
        logger: the run's W&B logger; its run is started now, on the main thread.
    """

    def __init__(self, logger: WandbLogger) -> None:
        self._run: Any = logger.experiment
        self._animations: dict[str, tuple[str, int]] = {}

    def log_images(self, images: Mapping[str, Tensor], step: int, caption: str) -> None:
        import wandb

        check_images(images)
        row: dict[str, Any] = {tag: wandb.Image(to_pil(image), caption=caption) for tag, image in images.items()}
        self._run.log({**row, STEP_KEY: step})

    def log_animation(self, tag: str, path: str, step: int) -> None:
        path = os.path.abspath(path)
        if tag not in self._animations:
            files = os.path.abspath(self._run.dir)
            inside = os.path.commonpath([files, path]) == files
            self._run.save(path, base_path=files if inside else os.path.dirname(path), policy="live")
        self._animations[tag] = (path, step)

    def close(self) -> None:
        import wandb

        for tag, (path, step) in self._animations.items():
            if path.lower().endswith(".gif") and os.path.isfile(path):
                self._run.log({f"{tag}_timelapse": wandb.Video(path, format="gif"), STEP_KEY: step})
        self._animations.clear()
