"""Run by test_metrics_ddp.py: metrics updated in Lightning validation on 2 CPU processes (DDP, gloo).

Usage: python ddp_metrics_script.py OUT_PREFIX. Each rank writes OUT_PREFIX.<rank>.json
with the synced means and per-sample scores it sees at the end of validation.
"""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
from _metrics_support import batch, tiny_cnn
from torch.utils.data import DataLoader, TensorDataset

from sp_lightning import SoftPullback
from sp_lightning.distributed import releasing_process_group
from sp_lightning.metrics import FaithfulnessCorrelation, RandomLogit

SAMPLES = 8


def dataset() -> TensorDataset:
    """Inputs, their Soft Pullbacks (computed up front) and targets."""
    model = tiny_cnn()
    x, y, a = batch(size=SAMPLES)
    return TensorDataset(x, a, SoftPullback(model).attribute(x, y), y)


class Validated(L.LightningModule):
    def __init__(self, out: str) -> None:
        super().__init__()
        self.out = out
        self.net = tiny_cnn()
        self.faithfulness = FaithfulnessCorrelation(self.net)
        self.random_logit = RandomLogit(self.net, SoftPullback(self.net))

    def validation_step(self, batch: list[torch.Tensor], index: int) -> None:
        x, a, pullback, y = batch
        assert not torch.is_grad_enabled()  # Lightning validates under no_grad with gloo (inference_mode otherwise)
        self.faithfulness.update(x, a, y)
        self.random_logit.update(x, pullback, y)

    def on_validation_epoch_end(self) -> None:
        result = {
            name: {"mean": float(metric.compute()), "per_sample": metric.per_sample_scores().tolist()}
            for name, metric in (("faithfulness", self.faithfulness), ("random_logit", self.random_logit))
        }
        with open(f"{self.out}.{self.global_rank}.json", "w") as handle:
            json.dump(result, handle)


if __name__ == "__main__":
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    with releasing_process_group():
        trainer.validate(Validated(sys.argv[1]), DataLoader(dataset(), batch_size=2), verbose=False)
