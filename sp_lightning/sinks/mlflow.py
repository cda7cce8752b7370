"""Pictures into an MLflow run (its images view, with a step slider, and its artifacts)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from urllib.parse import unquote, urlparse

from lightning.pytorch.loggers import MLFlowLogger
from torch import Tensor

from ..display.layout import to_pil
from .base import ImageSink, check_images
from .files import png_path


def local_artifact_dir(logger: MLFlowLogger) -> str | None:
    """The run's artifact directory when it is on this machine (a ``file:`` or plain-path store), else None.

    Args:
        logger: an MLflow logger; reading it starts its run.
    """
    uri = logger.experiment.get_run(logger.run_id).info.artifact_uri
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return os.path.abspath(unquote(parsed.path))
    if parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (one letter: a Windows drive)
        return os.path.abspath(uri)
    return None


class MlflowSink(ImageSink):
    """Logs each picture with ``MlflowClient.log_image(run_id, image, key=tag, step=step)``.

    Clients older than MLflow 2.12 have no ``key``/``step``; there each picture becomes the
    artifact ``<tag parts>/step_00000120.png``. A time-lapse is logged as the artifact
    ``<tag>/<file name>``, replaced each time (nothing to do when the file already sits in the
    run's local artifact directory).

    Args:
        logger: the run's MLflow logger; its client and run id are taken now, on the main thread.
    """

    def __init__(self, logger: MLFlowLogger) -> None:
        self._client = logger.experiment
        self._run_id = logger.run_id
        self._artifacts = local_artifact_dir(logger)
        self._keyed = "key" in inspect.signature(self._client.log_image).parameters

    def log_images(self, images: Mapping[str, Tensor], step: int, caption: str) -> None:
        check_images(images)
        for tag, image in images.items():
            if self._keyed:
                self._client.log_image(self._run_id, to_pil(image), key=tag, step=step)
            else:
                self._client.log_image(self._run_id, to_pil(image), artifact_file=png_path("", tag, step))

    def log_animation(self, tag: str, path: str, step: int) -> None:
        path = os.path.abspath(path)
        if self._artifacts is not None and os.path.commonpath([self._artifacts, path]) == self._artifacts:
            return
        self._client.log_artifact(self._run_id, path, artifact_path=tag)
