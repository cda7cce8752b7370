"""Where one run's pictures go: one :class:`ImageSink` per kind of logger behind one small interface.

:func:`image_sinks` picks them for a trainer (TensorBoard, W&B, MLflow and Comet show the pictures;
other loggers, or none, get PNG files in their own run directory); :func:`run_directory` is
where the run's time-lapse files belong. ``wandb``, ``mlflow`` and ``comet_ml`` are imported
only inside the sinks that feed their loggers, so this package works without them.
"""

from .base import ImageSink
from .comet import CometSink
from .files import PngSink, png_path
from .mlflow import MlflowSink
from .selection import fresh_run_directory, image_sinks, logger_run_directory, run_directory
from .tensorboard import TensorBoardSink
from .wandb import WandbSink

__all__ = [
    "CometSink",
    "ImageSink",
    "MlflowSink",
    "PngSink",
    "TensorBoardSink",
    "WandbSink",
    "fresh_run_directory",
    "image_sinks",
    "logger_run_directory",
    "png_path",
    "run_directory",
]
