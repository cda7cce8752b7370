"""The one interface every destination of the callback's pictures implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

from torch import Tensor


class ImageSink(ABC):
    """Where one run's pictures go. Called from a background drawing thread, one call at a time.

    A sink is built on the main thread (global rank zero) when fitting starts and keeps what it
    needs from the logger then, so the drawing thread never reads live trainer attributes.
    Subclass it to send the pictures anywhere else; only :meth:`log_images` is required.

    Example:
        >>> import torch
        >>> class Remember(ImageSink):
        ...     def __init__(self):
        ...         self.seen = []
        ...     def log_images(self, images, step, caption):
        ...         self.seen.append((sorted(images), step, caption))
        >>> sink = Remember()
        >>> sink.log_images({"semantic_pullback/probe_00": torch.rand(3, 8, 8)}, step=120, caption="step 120")
        >>> sink.seen
        [(['semantic_pullback/probe_00'], 120, 'step 120')]

        Pass it to the callback with ``SemanticPullbackCallback(..., sinks=[Remember()])``.
    """

    @abstractmethod
    def log_images(self, images: Mapping[str, Tensor], step: int, caption: str) -> None:
        """Record one step's pictures.

        Args:
            images: tag -> ``(3, H, W)`` float tensor in [0, 1] (tags like ``'semantic_pullback/probe_00'``).
            step: the trainer's global step the pictures show.
            caption: e.g. ``'step 120 · epoch 3'`` (loggers that show captions use it).
        """

    def log_animation(self, tag: str, path: str, step: int) -> None:
        """Publish a time-lapse file (animated GIF or WebP) already written at ``path``.

        The file is rewritten after every log. The default does nothing: right for sinks whose
        run directory already holds the file (TensorBoard, PNG files).

        Args:
            tag: the pictures' tag the animation belongs to.
            path: the local animation file.
            step: the global step of its newest frame.
        """

    def close(self) -> None:
        """Flush what is pending at the end of fitting (the default has nothing to flush)."""


def check_images(images: Mapping[str, Tensor]) -> None:
    """Raise a ``ValueError`` naming the first tag whose picture is not a ``(3, H, W)`` float tensor."""
    for tag, image in images.items():
        if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
            shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
            raise ValueError(
                f"Image {tag!r} must be a (3, H, W) float tensor in [0, 1], got {shape}; "
                "convert grayscale with image.expand(3, -1, -1) and uint8 with image / 255."
            )
