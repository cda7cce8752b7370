"""Soft training under DDP (2 CPU processes, gloo) matches single-process soft training on the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from ddp_soft_training import run

SCRIPT = Path(__file__).with_name("ddp_soft_training.py")


def test_ddp_two_processes_match_one_process(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    root = str(Path(__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "ddp", "2"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)
    assert ddp["world_size"] == 2

    single, _ = run("auto", 1)
    assert ddp["taus"] == single.step_taus  # the schedule advanced identically on every rank
    for name, value in single.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], value, atol=1e-6, rtol=1e-5, msg=name)

    plain, _ = run("auto", 1, soft=False)  # and the soft run is not what plain training gives
    assert max((ddp["state"][k] - v).abs().max().item() for k, v in plain.state_dict().items()) > 1e-4
