"""A callback for test_ddp_recipe.py: each DDP process writes what it ran on (importable by the CLI)."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback


class RecordDistributed(Callback):
    """At fit start, every rank writes ``rank<r>.json``: world size, process-group backend, device type.

    Args:
        out_dir: folder the reports go to.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        report = {
            "world_size": trainer.world_size,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "device": pl_module.device.type,
            "strategy": type(trainer.strategy).__name__,
        }
        with open(os.path.join(self.out_dir, f"rank{trainer.global_rank}.json"), "w") as handle:
            json.dump(report, handle)
