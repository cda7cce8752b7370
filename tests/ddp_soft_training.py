"""Soft training of SmallCNN on several CPU processes; run by test_soft_training_ddp.py.

    python tests/ddp_soft_training.py OUT.pt STRATEGY DEVICES

Lightning's ``ddp`` strategy re-launches this script for the other ranks, hence
the ``__main__`` guard. The global batch is 8 samples in dataset order, split
over the processes by an unshuffled DistributedSampler (Lightning's automatic
sampler would shuffle the training data). Rank 0 saves the final weights and
the temperatures its training steps saw.
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from _soft_training_models import SmallCNN, cnn_data, trainer
from torch.utils.data import DataLoader, DistributedSampler

from sp_lightning import SoftBackwardTraining
from sp_lightning.distributed import releasing_process_group

#: Shared with the test: same seed, schedule, steps and global batch as the single-process reference.
SEED, STEPS, GLOBAL_BATCH = 0, 3, 8
SCHEDULE = {"kind": "linear", "tau_end": 0.2}


class InOrderData(pl.LightningDataModule):
    """Each rank takes every world_size-th sample, in order: step k covers samples 8k..8k+7 on any world size."""

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        data = cnn_data(32)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)


def run(strategy: str, devices: int, soft: bool = True) -> tuple[SmallCNN, pl.Trainer]:
    """Train a fresh SmallCNN (with the soft backward rules unless ``soft=False``); returns the model and the trainer."""
    torch.manual_seed(SEED)
    model = SmallCNN(lr=0.5)
    callbacks = [SoftBackwardTraining(schedule=SCHEDULE)] if soft else []
    t = trainer(
        callbacks=callbacks, strategy=strategy, devices=devices, max_steps=STEPS, use_distributed_sampler=False
    )
    t.fit(model, datamodule=InOrderData())
    return model, t


if __name__ == "__main__":
    out, strategy, devices = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with releasing_process_group():
        model, t = run(strategy, devices)
    if t.global_rank == 0:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        torch.save({"state": state, "taus": model.step_taus, "world_size": t.world_size}, out)
