"""Models: a generic image classifier over timm, torchvision or built-in backbones."""

from .backbones import SmallCNN, build_backbone
from .classifier import ImageClassifier

__all__ = ["ImageClassifier", "SmallCNN", "build_backbone"]
