"""``make gpu-check`` without CUDA: the dry run of its plumbing at tiny sizes on CPU (what CI runs of it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"
CHECKS = ("batched", "cudnn_bn", "bf16_mixed", "lightning", "zoo")
PARTS = ("engine", "training", "callback", "metrics")


def test_gpu_check_dry_run_passes_every_check_and_prints_every_part() -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env,
                          timeout=900)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-4000:]
    assert out.startswith("no CUDA: dry run of the plumbing at tiny sizes on CPU"), out[:500]
    lines = out.splitlines()
    for name in CHECKS:
        assert any(line.startswith(f"PASS {name}:") for line in lines), (name, out[-4000:])
    assert not any(line.startswith("FAIL") for line in lines), out[-4000:]
    summary = out[out.index("SUMMARY"):]
    for part in PARTS:
        assert f"  {part} " in summary, (part, summary)
    assert "all checks passed" in summary
