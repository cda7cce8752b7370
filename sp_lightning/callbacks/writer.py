"""The drawing thread: turns one log's :class:`~sp_lightning.display.panels.Frame` into pictures and files.

For each frame the writer draws the panels, adds them to the time-lapse files and hands
both to every image sink. It works on one frame at a time, on a background thread at
the lowest CPU priority (or inline), and only ever sees the frame, an immutable
snapshot: never the callback's live attributes.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

import torch

from ..display.panels import Frame, render_panels
from ..display.timelapse import TimeLapse
from ..sinks import ImageSink


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for drawing panels: on ~100 KB tensors, waking a thread pool costs more than the work.

    The setting belongs to the calling thread (OpenMP), so the background drawing thread
    keeps one thread for its whole life without touching the training thread's.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _drawing_thread_init() -> None:
    """Initialiser of the background drawing thread: one intra-op thread (see :func:`one_thread`).

    On Linux the thread also takes the lowest CPU priority (a per-thread nice value), so when
    training keeps every core busy the drawing fills the gaps instead of preempting training's
    OpenMP threads, whose barriers stall whenever one of them is descheduled.
    """
    torch.set_num_threads(1)
    if sys.platform.startswith("linux"):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class PanelWriter:
    """Draws frames and writes them to ``sinks`` and ``timelapse``, one frame at a time.

    Args:
        sinks: where the pictures go (one per logger that takes images, plus the user's).
        timelapse: the run's time-lapse files, or ``None`` for none.
        background: draw on a background thread; ``False``: draw inline in :meth:`write`.
    """

    def __init__(self, sinks: Sequence[ImageSink], timelapse: TimeLapse | None, background: bool) -> None:
        self.sinks = tuple(sinks)
        self.timelapse = timelapse
        self.background = background
        self._thread: ThreadPoolExecutor | None = None
        self._pending: tuple[int, Future[None]] | None = None  # (step, its frame being drawn and written)

    def draw(self, frame: Frame) -> None:
        """Draw ``frame`` and write it everywhere (on whichever thread calls this)."""
        panels = render_panels(frame)
        files = self.timelapse.add(panels, frame.step) if self.timelapse is not None else {}
        caption = f"step {frame.step} · epoch {frame.epoch}"
        for sink in self.sinks:
            sink.log_images(panels, frame.step, caption)
            for tag, path in files.items():
                sink.log_animation(tag, path, frame.step)

    def write(self, frame: Frame) -> None:
        """Draw and write ``frame``: queued on the drawing thread, or inline. Call :meth:`wait` first."""
        if self._pending is not None:
            raise RuntimeError("PanelWriter.write: the previous frame is still pending; call wait() first.")
        if not self.background:
            with one_thread():
                self.draw(frame)
            return
        if self._thread is None:
            self._thread = ThreadPoolExecutor(1, "sp-lightning-drawing", initializer=_drawing_thread_init)
        self._pending = (frame.step, self._thread.submit(self.draw, frame))

    def wait(self) -> tuple[int, BaseException] | None:
        """Block until the pending frame is written; its step and error if it failed."""
        if self._pending is None:
            return None
        step, future = self._pending
        self._pending = None
        error = future.exception()
        return None if error is None else (step, error)

    def close(self) -> tuple[int, BaseException] | None:
        """Wait for the pending frame, end the drawing thread and close the sinks; the pending frame's failure."""
        try:
            failure = self.wait()
        finally:
            if self._thread is not None:
                self._thread.shutdown()
                self._thread = None
        for sink in self.sinks:
            sink.close()
        return failure
