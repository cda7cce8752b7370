"""Run by test_callback_ddp.py: the callback under 2-process DDP (gloo, CPU); every rank writes a JSON report.

``strategy="ddp"`` re-launches this file for rank 1, hence the ``__main__`` guard.
Rank 1's explanation fails once (at step ``FAIL_STEP``) to show that a failure on
one rank neither hangs the other nor stops training.

    python tests/callback_ddp_script.py OUT_DIR
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from callback_support import BlobData, TinyClassifier  # noqa: E402

from sp_lightning import SemanticPullbackCallback, SoftPullback  # noqa: E402
from sp_lightning.distributed import releasing_process_group  # noqa: E402
from sp_lightning.metrics import FaithfulnessCorrelation  # noqa: E402

FAIL_STEP = 2


class Watched(SemanticPullbackCallback):
    """Records which probe images this rank explains and whether the DDP wrapper's forward ran during a log."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.explained: list[tuple[int, list[int]]] = []
        self.wrapper_calls = 0
        self.wrapper = ""
        self.trainer: pl.Trainer | None = None

    def explain(self, model: nn.Module, images: Tensor, labels: Tensor | None) -> Any:
        step, rank = self.trainer.global_step, self.trainer.global_rank
        if rank == 1 and step == FAIL_STEP:
            raise RuntimeError("rank 1 fails here")
        probe = self.probe.images.to(images)
        self.explained.append((step, [int((probe == img).flatten(1).all(1).nonzero()) for img in images]))
        return super().explain(model, images, labels)

    def log_explanations(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.trainer = trainer
        wrapper = trainer.strategy.model
        self.wrapper = type(wrapper).__name__
        calls: list[int] = []
        handle = wrapper.register_forward_pre_hook(lambda *args: calls.append(1))
        try:
            super().log_explanations(trainer, pl_module)
        finally:
            handle.remove()
        self.wrapper_calls += len(calls)


def main(out: str) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    callback = Watched(num_images=5, metrics=["faithfulness_correlation"])
    trainer = pl.Trainer(
        strategy="ddp",
        accelerator="cpu",
        devices=2,
        max_epochs=2,
        callbacks=[callback],
        logger=TensorBoardLogger(out, name="tb"),
        default_root_dir=out,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyClassifier(), datamodule=BlobData())
    # the last log (step 4) scored the final model: the metric by hand on the whole probe set, one process
    model, probe = trainer.lightning_module, callback.probe
    metric = FaithfulnessCorrelation(model, sync_on_compute=False)
    metric.update(probe.images, SoftPullback(model).attribute(probe.images, probe.labels), probe.labels)
    report = {
        "rank": trainer.global_rank,
        "faithfulness_correlation": float(metric.compute()),
        "explained": callback.explained,
        "wrapper": callback.wrapper,
        "wrapper_calls": callback.wrapper_calls,
        "probe_checksum": float(callback.probe.images.double().sum()),
        "failures": [str(w.message) for w in caught if "SemanticPullbackCallback failed" in str(w.message)],
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    with releasing_process_group():
        main(sys.argv[1])
