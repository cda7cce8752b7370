"""Soft training of SmallCNN under FSDP2 on CPU processes (gloo); run by ``fsdp_runs.py``.

Two fits with ``ModelParallelStrategy`` (``fully_shard`` in ``configure_model``), on
global batches of 8 samples in dataset order (2 steps an epoch): the whole run, which
also writes a sharded checkpoint at the end of the first epoch, and a fresh fit
resumed from that checkpoint to the same end. :func:`fit` with ``devices=1`` and no
sharding is the single-process reference.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from _soft_training_models import SmallCNN, cnn_data, trainer
from ddp_soft_training import GLOBAL_BATCH, SCHEDULE, SEED, STEPS, InOrderData
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, DistributedSampler

from sp_lightning import SoftBackwardTraining

SAMPLES = 16  # two global batches: the checkpoint after epoch 1 resumes at a fresh epoch


def sharded(devices: int) -> ModelParallelStrategy:
    """FSDP2 over all ``devices`` (the strategy's default mesh would give them to tensor parallelism instead)."""
    return ModelParallelStrategy(data_parallel_size=devices, tensor_parallel_size=1)


class TwoStepEpochs(InOrderData):
    """``InOrderData`` on the first ``SAMPLES`` samples."""

    def train_dataloader(self) -> DataLoader:
        world, rank = self.trainer.world_size, self.trainer.global_rank
        data = cnn_data(SAMPLES)
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(data, batch_size=GLOBAL_BATCH // world, sampler=sampler)


class ShardedCNN(SmallCNN):
    """SmallCNN with FSDP2: the convolution and the linear layer sharded on their own, then the whole body."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.net[0], mesh=mesh)
        fully_shard(self.net[4], mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def fit(
    out: str, resume: str | None = None, devices: int = 2, soft: bool = True
) -> tuple[pl.Trainer, dict[str, Tensor], list[float | None]]:
    """One fit (FSDP2 on ``devices`` > 1, else one plain process), soft unless ``soft=False``, saving a checkpoint
    after every epoch unless it resumes; returns the trainer, the gathered full weights (on rank 0) and the
    temperatures of its training steps."""
    torch.manual_seed(SEED)
    model = ShardedCNN(lr=0.5) if devices > 1 else SmallCNN(lr=0.5)
    saving = ModelCheckpoint(dirpath=out, filename="resume-{epoch}", every_n_epochs=1, save_top_k=-1)
    t = trainer(
        callbacks=[*([SoftBackwardTraining(schedule=SCHEDULE)] if soft else []), *([] if resume else [saving])],
        strategy=sharded(devices) if devices > 1 else "auto", devices=devices, max_steps=STEPS,
        use_distributed_sampler=False, enable_checkpointing=resume is None, default_root_dir=out,
    )
    t.fit(model, datamodule=TwoStepEpochs(), ckpt_path=resume)
    if devices == 1:
        return t, model.state_dict(), model.step_taus
    state = get_model_state_dict(t.strategy.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return t, state, model.step_taus
