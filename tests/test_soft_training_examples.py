"""The soft-training study and the SLURM example run (tiny budgets)."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from _examples_support import assert_pullbacks_logged

from sp_lightning import SemanticPullbackCallback, SoftBackwardTraining

ROOT = Path(__file__).parents[1]


def load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of one TensorBoard run directory, as (step, value) pairs."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_study_quick_run_writes_its_tables(tmp_path: Path) -> None:
    study = load(ROOT / "examples" / "soft_training_study.py")
    rows = study.main(["--quick", "--out", str(tmp_path)])
    assert [r["variant"] for r in rows] == ["standard", "soft_constant", "soft_annealed"]
    for row in rows:
        assert set(row) == {"variant", "train_seconds", *study.METRICS}
        for metric in study.METRICS:  # shares and hit rates in [0, 1]; cosines and correlations in [-1, 1]
            low = -1.0 if metric.startswith(("cosine", "faithfulness", "random_logit")) else 0.0
            assert low <= row[metric] <= 1.0, (row["variant"], metric, row[metric])
    with open(tmp_path / "results.csv") as f:
        written = list(csv.DictReader(f))
    assert [r["variant"] for r in written] == [r["variant"] for r in rows]
    for row, line in zip(rows, written):
        assert all(float(line[m]) == pytest.approx(row[m]) for m in study.METRICS)
    table = (tmp_path / "results.md").read_text()
    assert all(f"| {r['variant']} |" in table for r in rows) and "Chance level: accuracy 0.167" in table

    # One TensorBoard run per variant, so each tag overlays the variants: per-epoch probe and final values.
    logged = {r["variant"]: scalars(tmp_path / r["variant"]) for r in rows}
    for row in rows:
        tags = logged[row["variant"]]
        assert {f"study/{m}" for m in study.METRICS} <= set(tags)
        for metric in study.METRICS:
            assert tags[f"final/{metric}"][-1][1] == pytest.approx(row[metric], abs=1e-6)
    assert {tags["final/accuracy"][-1][0] for tags in logged.values()} == {2}  # the same budget: 64 images, batch 32
    # The variants really differ in how they train: no soft rules, constant tau, annealed tau.
    assert "soft_training/tau_relu" not in logged["standard"]
    constant = [v for _, v in logged["soft_constant"]["soft_training/tau_relu"]]
    annealed = [v for _, v in logged["soft_annealed"]["soft_training/tau_relu"]]
    assert len(constant) == len(annealed) == 2 and constant[0] == constant[1] == annealed[0] > annealed[1]
    # Each run also shows SemanticPullbackCallback's panels, one probe image per shape, before and after the epoch.
    for row in rows:
        assert_pullbacks_logged(tmp_path / row["variant"], steps=[0, 2], num_images=6)


def test_slurm_example_config_trains_locally(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI would also look at pytest's arguments
    assert subprocess.run(["bash", "-n", str(ROOT / "examples" / "slurm" / "soft_training.sbatch")]).returncode == 0
    train = load(ROOT / "examples" / "slurm" / "train.py")
    cli = train.main(
        [
            "fit",
            "--config", str(ROOT / "examples" / "slurm" / "config.yaml"),
            "--config", str(ROOT / "callbacks" / "soft_training_with_explanations.yaml"),
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
    assert any(isinstance(c, SemanticPullbackCallback) for c in cli.trainer.callbacks)
    assert cli.trainer.global_step == 2  # 64 images, batch 64, 2 epochs
    assert "soft_training/tau_relu" in cli.trainer.logged_metrics
    # the explanations of the 8 probe images: before training and after each epoch
    assert_pullbacks_logged(cli.trainer.logger.log_dir, steps=[0, 1, 2], num_images=8)
    assert scalars(cli.trainer.logger.log_dir)["semantic_pullback/metrics/random_logit"]
