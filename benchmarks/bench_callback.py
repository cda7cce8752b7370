"""Overhead of the default ``SemanticPullbackCallback()`` on a small CPU training run.

    .venv/bin/python benchmarks/bench_callback.py            # ~9 min: 2 epochs of ~60 s, twice each way
    .venv/bin/python benchmarks/bench_callback.py --quick    # ~1 min smoke run
    .venv/bin/python benchmarks/bench_callback.py --threads 1  # both runs on one intra-op thread

A small CNN trains on generated 32x32 RGB images (10 classes) with a TensorBoard
logger, once without and once with the callback at its defaults (8 probe images,
a baseline plus one log per epoch), alternating (without, with, without, with) in
one process so that changes in machine load hit both alike. The epoch length is
calibrated to ``--epoch-seconds`` of training first. Printed: the ratio of total
``trainer.fit`` wall time with / without the callback for the fastest run of each
(the least disturbed by other programs; the target is <= 1.02), the ratio of each
pair and of the totals, the same for process CPU time, and the callback's own
seconds per log on the training thread (its ``semantic_pullback/seconds`` scalar)
as a share of an epoch. On a shared machine whose wall times swing by several
percent, the training thread's CPU-time ratio is the steadier figure: it leaves
out time the machine gives to other programs, and the drawing thread's work, so
it is the overhead whenever a core is spare (e.g. GPU training).

Drift: on a shared machine the steady training step itself can run 15% slower in
one run than in the next, with or without the callback. So each run's wall time
is also counted in units of its own median training step (``wall / median step``):
the callback's time (its logs, and slower steps while it draws) shows up as extra
step-equivalents, while a machine-wide change of step speed cancels. Printed as
the step-normalised ratio, next to the ratio of median step times (which would
show a callback that slowed every step).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sp_lightning import SemanticPullbackCallback  # noqa: E402

MEAN, STD = [0.45, 0.45, 0.45], [0.25, 0.25, 0.25]
BATCH = 64


class SmallCNN(pl.LightningModule):
    """Four conv layers with BatchNorm, max-pooling, dropout and a linear head (about 100k parameters)."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Dropout(0.2), nn.Linear(128, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = batch
        return F.cross_entropy(self(images), labels)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self(images), labels))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def generated(count: int, seed: int) -> TensorDataset:
    """Images whose class sets the colour and position of a bright patch, normalised with MEAN/STD."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (count,), generator=generator)
    images = 0.3 * torch.rand(count, 3, 32, 32, generator=generator)
    for i, label in enumerate(labels.tolist()):
        top, left = 4 + 2 * (label % 5), 4 + 10 * (label // 5)
        images[i, label % 3, top : top + 12, left : left + 12] += 0.7
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    return TensorDataset((images.clamp(0, 1) - mean) / std, labels)


class Data(pl.LightningDataModule):
    """Generated train/val data with the attributes the callback reads."""

    def __init__(self, batches: int) -> None:
        super().__init__()
        self.mean, self.std = MEAN, STD
        self.class_names = [f"class {i}" for i in range(10)]
        self.train_set, self.val_set = generated(batches * BATCH, 0), generated(256, 1)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, BATCH, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, BATCH)


class StepClock(pl.Callback):
    """Times every training step (from one ``on_train_batch_end`` to the next)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, *args: Any) -> None:
        self.stamps.append(time.perf_counter())

    @property
    def median_step(self) -> float:
        return statistics.median(b - a for a, b in zip(self.stamps, self.stamps[1:]))


class Seconds(Logger):
    """Keeps the callback's per-log ``seconds`` scalar."""

    name, version = "seconds", 0

    def __init__(self) -> None:
        super().__init__()
        self.values: list[float] = []

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if "semantic_pullback/seconds" in metrics:
            self.values.append(metrics["semantic_pullback/seconds"])

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass


def calibrate(epoch_seconds: float) -> int:
    """Training batches that take about ``epoch_seconds``."""
    model, data = SmallCNN(), generated(BATCH * 4, 2)
    optimizer = model.configure_optimizers()
    loader = DataLoader(data, BATCH)
    for _ in range(2):
        for step, batch in enumerate(loader):
            if step == 1:
                start = time.perf_counter()
            optimizer.zero_grad()
            model.training_step(batch, 0).backward()
            optimizer.step()
    per_batch = (time.perf_counter() - start) / (len(loader) - 1)
    return max(4, round(epoch_seconds / per_batch))


class Run(NamedTuple):
    """What one fit measured."""

    wall: float  # seconds of trainer.fit
    cpu: float  # process CPU seconds
    thread: float  # training-thread CPU seconds
    step: float  # median training step, seconds
    logs: list[float]  # the callback's seconds per log


def run(with_callback: bool, batches: int, epochs: int, root: str, accelerator: str = "cpu") -> Run:
    """One fit with or without the callback (``accelerator``: Lightning's, e.g. ``"gpu"``)."""
    pl.seed_everything(0, verbose=False)
    seconds, clock = Seconds(), StepClock()
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_epochs=epochs,
        callbacks=[clock, SemanticPullbackCallback()] if with_callback else [clock],
        logger=[TensorBoardLogger(root), seconds],
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_val_batches=2,
        log_every_n_steps=10,
    )
    model, data = SmallCNN(), Data(batches)
    wall, cpu, thread = time.perf_counter(), time.process_time(), time.thread_time()
    trainer.fit(model, datamodule=data)
    return Run(time.perf_counter() - wall, time.process_time() - cpu, time.thread_time() - thread,
               clock.median_step, seconds.values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epoch-seconds", type=float, default=60.0, help="training time per epoch to aim for")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration, alternating")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads for both (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 8 s epochs, 1 epoch, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.epoch_seconds, args.epochs, args.repeats = 8.0, 1, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    batches = calibrate(args.epoch_seconds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {batches} batches of {BATCH} per epoch "
          f"(~{args.epoch_seconds:.0f} s), {args.epochs} epochs, {args.repeats} runs each way", flush=True)
    runs: dict[bool, list[Run]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(args.repeats):
            for with_callback in (False, True):
                result = run(with_callback, batches, args.epochs, os.path.join(root, str(repeat)))
                runs[with_callback].append(result)
                label = "with   " if with_callback else "without"
                logs = result.logs
                extra = f", {len(logs)} logs: " + ", ".join(f"{s:.2f}" for s in logs) + " s" if logs else ""
                print(f"  run {repeat + 1} {label}: wall {result.wall:7.1f} s, cpu {result.cpu:7.1f} s, training thread "
                      f"{result.thread:7.1f} s, median step {1000 * result.step:6.1f} ms{extra}", flush=True)

    def total(with_callback: bool, field: str) -> float:
        return sum(getattr(r, field) for r in runs[with_callback])

    walls = {key: [r.wall for r in value] for key, value in runs.items()}
    pairs = [with_ / without for with_, without in zip(walls[True], walls[False])]
    epoch = min(walls[False]) / args.epochs
    per_log = [s for r in runs[True] for s in r.logs]
    log = statistics.median(per_log) if per_log else math.nan
    print(f"callback seconds per log (training thread): median {log:.2f} s = {100 * log / epoch:.2f}% of a {epoch:.1f} s epoch")
    print(f"CPU-time ratio with/without (totals; includes the drawing thread): {total(True, 'cpu') / total(False, 'cpu'):.4f}")
    # Time the machine gives to other programs is not counted here: the overhead whenever a core is spare.
    print(f"training-thread CPU-time ratio with/without (totals): {total(True, 'thread') / total(False, 'thread'):.4f}")
    print("wall ratio of each pair of runs: " + ", ".join(f"{r:.4f}" for r in pairs))
    print(f"wall ratio of the totals: {total(True, 'wall') / total(False, 'wall'):.4f}")
    steps = {key: statistics.median(r.step for r in value) for key, value in runs.items()}
    normalised = {key: statistics.median(r.wall / r.step for r in value) for key, value in runs.items()}
    print(f"median training step with/without: {steps[True] / steps[False]:.4f} (machine drift, or a callback slowing every step)")
    print(f"step-normalised wall ratio with/without (wall / the run's median step; drift cancels): "
          f"{normalised[True] / normalised[False]:.4f}")
    # Load from other programs only ever adds time, so the fastest run of each kind is the least disturbed.
    print(f"RATIO wall time with/without callback, fastest runs: {min(walls[True]) / min(walls[False]):.4f} (target <= 1.02)")


if __name__ == "__main__":
    main()
