"""Process-group hygiene for scripts that run Lightning's multi-process strategies."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist


def _group_exists() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def releasing_process_group() -> Iterator[None]:
    """Destroy the default process group on leaving the block, if the block created it.

    Lightning's DDP strategies start a process group and never destroy it. A gloo group still
    alive while the interpreter shuts down can abort the process ("terminate called without an
    active exception", exit status -6) after the run itself has finished fine, so a script's
    entry point should release it. A group that existed before the block is the caller's and is
    left alone.
    """
    existed = _group_exists()
    try:
        yield
    finally:
        if not existed and _group_exists():
            dist.destroy_process_group()


def gather_objects(payload: Any, world_size: int) -> list[Any]:
    """Every rank's picklable ``payload`` on every rank, in rank order (one collective all ranks must reach)."""
    if world_size == 1 or not _group_exists():
        return [payload]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, payload)
    return gathered
