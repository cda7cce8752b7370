"""The LightningCLI recipe ``callbacks/soft_training.yaml`` loads and trains a tiny model as it says."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
from _soft_training_models import TinyMLP, loader, mlp_data
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

from sp_lightning import SoftBackwardTraining, TemperatureSchedule

RECIPE = Path(__file__).parents[1] / "callbacks" / "soft_training.yaml"


class MLPData(pl.LightningDataModule):
    """Two in-order batches per epoch."""

    def train_dataloader(self) -> DataLoader:
        return loader(mlp_data())


def test_recipe_loads_and_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["train.py"])  # LightningCLI would also look at pytest's arguments
    cli = LightningCLI(
        TinyMLP,
        MLPData,
        save_config_callback=None,
        args=[
            "fit",
            "--config", str(RECIPE),
            "--trainer.max_epochs=3",
            "--trainer.accelerator=cpu",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={tmp_path}",
        ],
    )  # fmt: skip
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, SoftBackwardTraining)]
    assert cb.plan.base.tau("relu") == 0.6 and cb.plan.base.tau("maxpool") == 0.3
    assert cb.plan.schedules["relu"] == TemperatureSchedule(kind="cosine", tau_end=0.05, warmup=1, unit="epoch")
    assert cb.plan.schedules["maxpool"] == TemperatureSchedule()
    # epoch 0: warm-up from the plain gradient (ReLU rule off); epoch 1: tau0; epoch 2: half-way down the cosine
    assert cli.model.step_taus == pytest.approx([None, None, 0.6, 0.6, 0.325, 0.325])
