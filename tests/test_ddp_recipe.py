"""``callbacks/ddp.yaml`` runs as it is on a machine without a GPU: DDP on the CPU with a gloo process group.

The recipe is used the way its comment says (``--trainer.devices=2`` for two CPU processes), with no
accelerator override; ``CUDA_VISIBLE_DEVICES`` is emptied so that a GPU machine tests the CPU path too.
DDP re-launches the command for rank 1, so the CLI runs as its own process.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
RECIPE = ROOT / "callbacks" / "ddp.yaml"


def test_ddp_recipe_trains_with_two_cpu_processes(tmp_path: Path) -> None:
    probe = tmp_path / "probe.yaml"  # a third config: each rank reports what it ran on
    callback = {"class_path": "ddp_recipe_probe.RecordDistributed", "init_args": {"out_dir": str(tmp_path)}}
    probe.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    args = [
        "fit",
        "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--config", str(RECIPE),
        "--config", str(probe),
        "--trainer.devices=2",
        f"--trainer.default_root_dir={tmp_path}",
    ]  # fmt: skip
    pythonpath = os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "PYTHONPATH": pythonpath, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sp_lightning.cli", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,  # a hang fails here
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]

    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report == {"world_size": 2, "backend": "gloo", "device": "cpu", "strategy": "DDPStrategy"}
    run_dir = tmp_path / "lightning_logs" / "version_0"
    effective = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]
    assert (effective["accelerator"], effective["strategy"], int(effective["devices"])) == ("auto", "ddp", 2)
    # each process trained on its half of the data: half the optimizer steps of one process
    data = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["data"]["init_args"]
    checkpoint = torch.load(next((run_dir / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)
    steps_per_epoch = math.ceil(math.ceil(data["train_size"] / 2) / data["batch_size"])
    assert checkpoint["global_step"] == steps_per_epoch * effective["max_epochs"]

