"""What the callbacks need under Lightning's multi-process strategies: process-group hygiene, gathering,
the module an explanation runs under FSDP1, and a clear refusal of DeepSpeed."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.distributed as dist
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule


def _group_exists() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextmanager
def releasing_process_group() -> Iterator[None]:
    """Destroy the default process group on leaving the block, if the block created it.

    Lightning's DDP strategies start a process group and never destroy it. A gloo group still
    alive while the interpreter shuts down can abort the process ("terminate called without an
    active exception", exit status -6) after the run itself has finished fine, so a script's
    entry point should release it. A group that existed before the block is the caller's and is
    left alone.
    """
    existed = _group_exists()
    try:
        yield
    finally:
        if not existed and _group_exists():
            dist.destroy_process_group()


def gather_objects(payload: Any, world_size: int) -> list[Any]:
    """Every rank's picklable ``payload`` on every rank, in rank order (one collective all ranks must reach)."""
    if world_size == 1 or not _group_exists():
        return [payload]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, payload)
    return gathered


def refuse_deepspeed(trainer: Any, owner: str) -> None:
    """Raise a clear error if ``trainer`` runs DeepSpeed, which ``owner`` (a callback's name) does not support.

    ZeRO-3 partitions the parameters inside DeepSpeed's engine, which gathers them only in
    its own forward and backward; the callbacks run their forwards and input-gradient
    backwards outside it, and neither path can be tested without a GPU.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise RuntimeError(
            f"{owner} does not support DeepSpeedStrategy: DeepSpeed gathers its partitioned parameters only inside "
            "its own engine, which the callback's explanations and soft backward rules bypass. Shard the model with "
            "ModelParallelStrategy (FSDP2: call fully_shard in configure_model) or FSDPStrategy instead, or use DDP."
        )


def explained_module(pl_module: nn.Module, module: nn.Module) -> nn.Module:
    """The module to run for explaining ``module`` (``pl_module`` itself or one of its submodules).

    A ``torch.compile``'d module (``OptimizedModule``) is explained through its original
    module, eagerly. Under FSDP1 (Lightning's ``FSDPStrategy``) every forward must enter
    through the root ``FullyShardedDataParallel`` wrapper, which gathers the parameters it
    holds itself and finishes the backward; its forward is the LightningModule's. FSDP2
    (``ModelParallelStrategy``) shards the modules in place, so they run as they are.

    Raises:
        ValueError: for a submodule under FSDP1, which cannot be run on its own.
    """
    module = module._orig_mod if isinstance(module, OptimizedModule) else module
    trainer = getattr(pl_module, "_trainer", None)
    from lightning.pytorch.strategies import FSDPStrategy

    if trainer is None or not isinstance(trainer.strategy, FSDPStrategy):
        return module
    if module is not pl_module:
        raise ValueError(
            "model_attr cannot be used with FSDPStrategy (FSDP1): a submodule cannot run outside FSDP's root wrapper, "
            "whose forward is the LightningModule's. Make the LightningModule's forward map images to logits and "
            "leave model_attr unset, or use ModelParallelStrategy (FSDP2), which runs any submodule."
        )
    return trainer.strategy.model
