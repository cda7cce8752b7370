"""releasing_process_group: entry points destroy the process group their run started, and only that one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist

from sp_lightning.distributed import releasing_process_group


def _start_group(tmp_path: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)


def test_a_group_started_inside_is_destroyed_also_after_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"), releasing_process_group():
        _start_group(tmp_path)
        assert dist.is_initialized()
        raise RuntimeError("boom")
    assert not dist.is_initialized()


def test_a_group_that_existed_before_is_left_alone(tmp_path: Path) -> None:
    _start_group(tmp_path)
    try:
        with releasing_process_group():
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_no_group_no_effect() -> None:
    with releasing_process_group():
        pass
    assert not dist.is_initialized()
