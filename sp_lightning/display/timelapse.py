"""Animated time-lapse files of one run: one GIF per tag, one frame per log, appended in place.

A GIF is a header followed by self-contained frame blocks and a one-byte trailer, so a new
frame is appended without re-encoding the old ones: each log encodes only its own frames
(with their own colour tables), copies the previous file without its trailer, adds the new
block and moves the result over the old file (``os.replace``: a reader or a crash never
sees half a file). Nothing but the frame sizes and steps stays in memory, however long the
run. Frames of different sizes are padded with white to the largest; when a larger frame
arrives the old ones are re-encoded once at the new size.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from PIL import Image, ImageSequence
from torch import Tensor

from .layout import to_pil

_TRAILER = b"\x3b"
_LOOP_FOREVER = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
#: Hundredths of a second each frame is shown.
FRAME_DELAY = 50


def gif_header(width: int, height: int) -> bytes:
    """GIF89a header for a ``width`` x ``height`` animation that loops forever (no global colour table)."""
    return b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0) + _LOOP_FOREVER


def frame_block(image: Image.Image, comment: str, delay: int = FRAME_DELAY) -> bytes:
    """One GIF frame of an RGB ``image``: delay, a comment, its own colour table and the compressed pixels."""
    paletted = image.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE)
    encoded = io.BytesIO()
    paletted.save(encoded, format="GIF")
    data = encoded.getvalue()
    packed = data[10]
    position = 13
    table = b""
    if packed & 0x80:  # Pillow writes the palette as a global table: it becomes this frame's local one
        table_size = 3 << ((packed & 0x07) + 1)
        table = data[position : position + table_size]
        position += table_size
    while data[position] == 0x21:  # skip Pillow's extensions; this frame gets its own
        position += 2
        while data[position]:
            position += data[position] + 1
        position += 1
    if data[position] != 0x2C:
        raise RuntimeError("Pillow wrote a GIF without an image descriptor; cannot append it as a frame.")
    descriptor = bytearray(data[position : position + 10])
    if table:
        descriptor[9] = (descriptor[9] & 0x40) | 0x80 | (packed & 0x07)  # local colour table of the same size
    pixels = data[position + 10 : data.rindex(_TRAILER)]
    control = b"\x21\xf9\x04" + struct.pack("<BHBB", 0x04, delay, 0, 0)  # disposal 1: keep, no transparency
    text = comment.encode("ascii", "replace")[:255]
    return control + b"\x21\xfe" + bytes([len(text)]) + text + b"\x00" + bytes(descriptor) + table + pixels


def pad(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``image`` at the top left of a white RGB canvas of ``size`` (width, height)."""
    if image.size == size:
        return image.convert("RGB")
    canvas = Image.new("RGB", size, (255, 255, 255))
    canvas.paste(image.convert("RGB"), (0, 0))
    return canvas


@dataclass
class _Track:
    """What one tag's file holds: its path, its frame size and the step of each frame."""

    path: str
    size: tuple[int, int]
    steps: list[int] = field(default_factory=list)


class TimeLapse:
    """Animated time-lapse files of one run: one per tag, rewritten after every log (a crash keeps what was made).

    ``<directory>/<last part of the tag>.gif``, e.g. ``probe_00.gif``, one frame per :meth:`add`
    (shown half a second each, looping), each labelled by the title drawn in the panel; the
    frame's step is also stored as its GIF comment.

    Args:
        directory: where the files go (created when the first frame arrives).
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._tracks: dict[str, _Track] = {}

    def steps(self, tag: str) -> list[int]:
        """The steps of the frames in ``tag``'s file, oldest first."""
        return list(self._tracks[tag].steps) if tag in self._tracks else []

    def add(self, panels: Mapping[str, Tensor], step: int) -> dict[str, str]:
        """Append one frame per tag (``(3, H, W)`` images in [0, 1]) and rewrite each file.

        Args:
            panels: tag -> picture of this log.
            step: the global step the pictures show.
        Returns:
            tag -> path of the file just (re)written.
        """
        os.makedirs(self.directory, exist_ok=True)
        written = {}
        for tag, image in panels.items():
            picture = to_pil(image)
            track = self._tracks.get(tag) or self._new_track(tag, picture.size)
            grown = (max(track.size[0], picture.width), max(track.size[1], picture.height))
            partial = track.path + ".partial"
            with open(partial, "wb") as out:
                if grown != track.size or not track.steps:
                    self._reencode(track, grown, out)
                else:
                    with open(track.path, "rb") as old:
                        shutil.copyfileobj(old, out)
                    out.seek(-len(_TRAILER), os.SEEK_END)
                    out.truncate()
                out.write(frame_block(pad(picture, track.size), f"step {step}") + _TRAILER)
            os.replace(partial, track.path)
            track.steps.append(step)
            written[tag] = track.path
        return written

    def _new_track(self, tag: str, size: tuple[int, int]) -> _Track:
        name = tag.rsplit("/", 1)[-1]
        clash = next((other for other, track in self._tracks.items() if os.path.basename(track.path) == f"{name}.gif"),
                     None)
        if clash is not None:
            raise ValueError(f"Tags {clash!r} and {tag!r} would share the time-lapse file {name}.gif; "
                             "give them different last parts.")
        self._tracks[tag] = _Track(os.path.join(self.directory, f"{name}.gif"), size)
        return self._tracks[tag]

    @staticmethod
    def _reencode(track: _Track, size: tuple[int, int], out: io.BufferedWriter) -> None:
        """Write the header for ``size`` and the track's old frames padded to it (after a larger frame arrived)."""
        out.write(gif_header(*size))
        if track.steps:
            with Image.open(track.path) as old:
                for frame, step in zip(ImageSequence.Iterator(old), track.steps):
                    out.write(frame_block(pad(frame, size), f"step {step}"))
        track.size = size
