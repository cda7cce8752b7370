"""The soft-training study and the SLURM example run (tiny budgets)."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from sp_lightning import SoftBackwardTraining

ROOT = Path(__file__).parents[1]


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_study_quick_run_writes_its_tables(tmp_path: Path) -> None:
    study = load(ROOT / "examples" / "soft_training_study.py")
    rows = study.main(["--quick", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == ["standard", "soft_constant", "soft_annealed"]
    for row in rows:
        assert all(0.0 <= row[m] <= 1.0 for m in study.METRICS if m != "cosine_grad_sp")
        assert -1.0 <= row["cosine_grad_sp"] <= 1.0
    with open(tmp_path / "results.csv") as f:
        assert [r["variant"] for r in csv.DictReader(f)] == [r["variant"] for r in rows]
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {r['variant']} |" in table for r in rows) and "Chance level" in table
    for variant in study.VARIANTS:  # one TensorBoard run per variant, so each tag overlays the variants
        assert list((tmp_path / variant).glob("events.out.tfevents.*"))


def test_slurm_example_config_trains_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI would also look at pytest's arguments
    assert subprocess.run(["bash", "-n", str(ROOT / "examples" / "slurm" / "soft_training.sbatch")]).returncode == 0
    train = load(ROOT / "examples" / "slurm" / "train.py")
    cli = train.main(
        [
            "fit",
            "--config", str(ROOT / "examples" / "slurm" / "config.yaml"),
            "--config", str(ROOT / "callbacks" / "soft_training.yaml"),
            "--trainer.accelerator=cpu",
            "--trainer.strategy=auto",
            "--trainer.devices=1",
            "--trainer.max_epochs=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--data.init_args.train_size=64",
            "--data.init_args.val_size=32",
        ]
    )  # fmt: skip
    assert any(isinstance(c, SoftBackwardTraining) for c in cli.trainer.callbacks)
    assert cli.trainer.global_step == 2  # 64 images, batch 64, 2 epochs
    assert "soft_training/tau_relu" in cli.trainer.logged_metrics
