"""Image-classification DataModules: synthetic shapes with object masks, CIFAR-10 and Imagenette."""

from .base import ImageDataModule
from .cifar import CIFAR10DataModule
from .imagenette import ImagenetteDataModule
from .shapes import SHAPE_NAMES, ShapeSample, ShapesDataModule, ShapesDataset

__all__ = [
    "SHAPE_NAMES",
    "CIFAR10DataModule",
    "ImageDataModule",
    "ImagenetteDataModule",
    "ShapeSample",
    "ShapesDataModule",
    "ShapesDataset",
]
