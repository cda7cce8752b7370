"""Run a real TensorBoard server on a log directory (``sp-lightning tensorboard``) and read its HTTP data API.

TensorBoard is where people watch the callback's explanations, so the suite
checks what TensorBoard itself serves (``tests/test_tensorboard_served.py``)
and the README screenshot is taken from it (``docs/screenshot.py``). Both start
the server the way a user does, ``tensorboard --logdir ...``, on localhost.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")

_SERVING = re.compile(r"TensorBoard \S+ at (http://\S+?/)")

#: TensorBoard keeps 10 images per tag unless told otherwise, dropping random steps of a long
#: time-lapse (the step-0 baseline too). A large count keeps every one; ``images=0``, documented
#: as "keep all", makes TensorBoard 2.21's default data server keep none.
KEEP_EVERY_IMAGE = ("--samples_per_plugin", "images=100000")


def tensorboard_command(logdir: str) -> str:
    """The shell command that opens ``logdir`` in TensorBoard keeping every logged image."""
    return f"sp-lightning tensorboard {logdir}"


def run_tensorboard(argv: Sequence[str]) -> int:
    """``sp-lightning tensorboard LOGDIR [tensorboard options]``: TensorBoard on LOGDIR, every image kept."""
    if not argv or argv[0].startswith("-"):
        print("usage: sp-lightning tensorboard LOGDIR [other tensorboard options, e.g. --port 6007]\n"
              f"Runs `tensorboard --logdir LOGDIR {' '.join(KEEP_EVERY_IMAGE)}`, so every logged step of the "
              "time-lapse is kept (TensorBoard's default keeps 10 per tag).", file=sys.stderr)
        return 2
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", argv[0], *KEEP_EVERY_IMAGE, *argv[1:]]
    try:
        return subprocess.call(command)
    except KeyboardInterrupt:
        return 0


@contextmanager
def serve_tensorboard(
    logdir: str, timeout: float = 60.0, extra_args: Sequence[str] = ()
) -> Iterator[str]:
    """Run ``tensorboard --logdir logdir`` (every image kept) on 127.0.0.1 (a free port) and yield its base URL.

    The server runs as a subprocess of this Python (``python -m tensorboard.main``) and is
    stopped on exit, also after an exception. Raises ``RuntimeError`` with the server's
    output when it exits early or does not serve within ``timeout`` seconds.
    """
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", logdir, *KEEP_EVERY_IMAGE,
               "--host", "127.0.0.1", "--port", "0", *extra_args]
    with tempfile.TemporaryFile("w+") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def printed() -> str:
            output.seek(0)
            return output.read()

        try:
            deadline = time.monotonic() + timeout
            while (match := _SERVING.search(printed())) is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    state = f"exited with code {process.returncode}" if process.poll() is not None else (
                        f"did not start serving within {timeout:.0f} s")
                    raise RuntimeError(f"TensorBoard ({' '.join(command)}) {state}. Its output:\n{printed()}")
                time.sleep(0.2)
            yield match.group(1)
        finally:
            process.terminate()  # TensorBoard exits cleanly on SIGTERM (and its data server with it)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def fetch(base_url: str, path: str, timeout: float = 30.0, **query: Any) -> bytes:
    """The body of ``GET base_url + path?query`` (``path`` without a leading slash)."""
    url = urllib.parse.urljoin(base_url, path)
    if query:
        url += "?" + urllib.parse.urlencode(query)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"GET {url} failed with HTTP {error.code}: {error.read()[:500]!r}") from error


def fetch_json(base_url: str, path: str, **query: Any) -> Any:
    """``GET`` a JSON endpoint of TensorBoard's data API, e.g. ``data/plugin/scalars/tags``."""
    return json.loads(fetch(base_url, path, **query))


def wait_until(poll: Callable[[], T], done: Callable[[T], bool], timeout: float, what: str) -> T:
    """Call ``poll`` until ``done(result)`` (TensorBoard loads event files in the background).

    Returns the first result that is done; raises ``TimeoutError`` naming ``what`` and the
    last result after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = poll()
        if done(result):
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"TensorBoard did not serve {what} within {timeout:.0f} s; last answer: {result!r}")
        time.sleep(0.5)
