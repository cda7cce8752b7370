"""Run by test_fsdp_strategies.py: both callbacks under FSDP2 (ModelParallelStrategy, 2 CPU processes, gloo).

One script, so the slow start of two processes is paid once:

1. soft training, whole and resumed from a sharded checkpoint (``fsdp_soft_training``);
   rank 0 saves the gathered full weights and the step temperatures to ``soft.pt``;
2. the same sharded classifier trained twice on the same data, without and with
   ``SemanticPullbackCallback`` (logging at fit start and after every step, 3 probe
   images, so rank 1's shard is padded), under bf16 mixed precision; rank 0 saves both
   runs' gathered full state dicts and the last log's Soft Pullbacks beside those of an
   unsharded copy of the final weights to ``states.pt``; every rank writes a JSON report
   of what its explanations saw;
3. ``callbacks/fsdp.yaml`` through the CLI, with both callbacks, on ``configs/tiny.yaml``.

``ModelParallelStrategy`` re-launches this file for rank 1, hence the ``__main__`` guard.

    python tests/fsdp_runs.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from callback_support import BlobData, TinyClassifier, trainer_kwargs  # noqa: E402
from fsdp_soft_training import fit, sharded  # noqa: E402

from sp_lightning import SemanticPullbackCallback  # noqa: E402
from sp_lightning.cli import run_cli  # noqa: E402
from sp_lightning.distributed import releasing_process_group  # noqa: E402
from sp_lightning.probe.explain import explain_probe  # noqa: E402

STEPS = 3


class ShardedClassifier(TinyClassifier):
    """TinyClassifier with FSDP2 applied in ``configure_model``: both convolutions and the head, then the root."""

    def configure_model(self) -> None:
        mesh = self.device_mesh["data_parallel"]
        for layer in (self.model.features[0], self.model.features[4], self.model.head):
            fully_shard(layer, mesh=mesh)
        fully_shard(self.model, mesh=mesh)


def _local_grads(module: nn.Module) -> list[Tensor | None]:
    """This rank's part of every parameter's gradient (copies)."""
    return [
        None if p.grad is None else (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).clone()
        for p in module.parameters()
    ]


class Watched(SemanticPullbackCallback):
    """Records, per log, the probe indices this rank explained and what the explanation left behind."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.logs: list[dict[str, Any]] = []
        self._seen: dict[str, Any] = {}

    def explain(self, model: nn.Module, images: Tensor, labels: Tensor | None) -> Any:
        probe = self.probe.images.to(images)
        self._seen["indices"] = [int((probe == img).flatten(1).all(1).nonzero()) for img in images]
        return super().explain(model, images, labels)

    def log_explanations(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._seen = {"step": trainer.global_step}
        dtypes: list[str] = []
        handle = pl_module.model.head.register_forward_hook(lambda m, i, out: dtypes.append(str(out.dtype)))
        grads = _local_grads(pl_module)
        self._seen["had_grads"] = any(g is not None for g in grads)
        try:
            super().log_explanations(trainer, pl_module)
        finally:
            handle.remove()
        after = _local_grads(pl_module)
        self._seen.update(
            forward_dtypes=sorted(set(dtypes)),
            sharded=all(isinstance(p, DTensor) for p in pl_module.parameters()),
            grads_kept=all(
                (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
                for a, b in zip(grads, after)
            ),
        )
        self.logs.append(self._seen)


def train(out: str, callback: Watched | None) -> tuple[pl.Trainer, dict[str, Tensor]]:
    """One FSDP2 fit from the same seed; returns the trainer and the gathered full state dict (on rank 0)."""
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(**trainer_kwargs(
        out, strategy=sharded(2), devices=2, precision="bf16-mixed", max_epochs=2, max_steps=STEPS,
        limit_val_batches=0, callbacks=[] if callback is None else [callback],
        logger=TensorBoardLogger(out, name="tb") if callback is not None else False,
    ))
    trainer.fit(ShardedClassifier(), datamodule=BlobData(train=32, val=16, batch_size=8))
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return trainer, get_model_state_dict(trainer.strategy.model, options=options)


def main(out: str) -> None:
    torch.set_num_threads(1)
    soft_dir = os.path.join(out, "soft")
    t, whole, whole_taus = fit(soft_dir)
    checkpoint = os.path.join(soft_dir, "resume-epoch=0.ckpt")
    _, resumed, resumed_taus = fit(soft_dir, resume=checkpoint)
    if t.global_rank == 0:
        torch.save(
            {"whole": whole, "whole_taus": whole_taus, "resumed": resumed, "resumed_taus": resumed_taus},
            os.path.join(out, "soft.pt"),
        )
    _, plain = train(out, None)
    callback = Watched(num_images=3, top_k=1, ascent_steps=2, every_n_steps=1, every_n_epochs=None)
    trainer, watched = train(out, callback)
    if trainer.is_global_zero:  # the last log explained the final weights: redo it on one unsharded copy
        copy = TinyClassifier()
        copy.load_state_dict(watched)
        probe = callback.probe
        alone = explain_probe(copy, probe.images, probe.labels, callback._settings).soft_maps[:, 0]
        torch.save(
            {"plain": plain, "watched": watched, "last_log": callback._previous, "unsharded": alone},
            os.path.join(out, "states.pt"),
        )
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as handle:
        json.dump({"logs": callback.logs, "probe_size": len(callback.probe.images)}, handle)
    run_cli([  # the recipe as its comment says, with both callbacks, on the tiny config
        "fit", "--config", os.path.join(ROOT, "configs", "tiny.yaml"),
        "--config", os.path.join(ROOT, "callbacks", "soft_training_with_explanations.yaml"),
        "--config", os.path.join(ROOT, "callbacks", "fsdp.yaml"),
        "--model.class_path=sp_lightning.models.sharded.ShardedImageClassifier",
        "--trainer.max_epochs=1", f"--trainer.default_root_dir={os.path.join(out, 'recipe')}",
    ])  # fmt: skip


if __name__ == "__main__":
    with releasing_process_group():
        main(sys.argv[1])
