"""Does soft-backward training make a network more interpretable? (docs/method.md section 5, open question 3)

Trains the library's small CNN (``ImageClassifier(backbone="small_cnn")``, AdamW,
cosine learning-rate decay) on the synthetic shapes (``ShapesDataModule``: every
image carries its object's ground-truth mask) once per variant, with the same
seed (so the same initial weights), the same data order and the same budget:

- ``standard``: plain training;
- ``soft_constant``: ``SoftBackwardTraining()`` (default temperatures, held constant);
- ``soft_annealed``: ``SoftBackwardTraining(schedule={"kind": "cosine", "tau_end": 0.05})``,
  annealed toward the plain gradient over the run.

Every explanation is taken toward the true class, for the plain gradient and for
the Soft Pullback (SP) with the default temperatures. On the held-out test split
the study measures:

- ``accuracy`` of the trained model;
- ``cosine_grad_sp``: the cosine between the gradient and SP (whole attribution tensors);
- localisation against the masks, on ``|attribution|`` summed over channels:
  ``pointing_*`` (``PointingGame``: is the map's maximum on the object) and
  ``mass_*`` (``RelevanceMass``: share of the map inside the mask);
- explanation quality, from :mod:`sp_lightning.metrics` with cheap settings:
  ``faithfulness_*`` (``FaithfulnessCorrelation`` at its defaults: a 4x4 grid of
  blocks set to 0, the dataset mean, one at a time, 16 forwards per image; Pearson
  correlation between a block's summed ``|attribution|`` and the drop of the target
  logit; higher is better) and ``random_logit_*`` (``RandomLogit``: Pearson
  correlation with the same explainer's map toward a random other class, one
  explanation per image, the same draws for every variant; lower is better).

Tables go to ``results.md`` and ``results.csv`` (with chance levels). TensorBoard
gets one run directory per variant, so every tag shows the variants on one chart:
``study/<measure>`` after every epoch on the validation split (the probe), and
``final/<measure>`` at the end on the test split, next to the classifier's own
``train/*``/``val/*`` curves and the callback's ``soft_training/tau_*``. Each run's
IMAGES tab shows ``SemanticPullbackCallback``'s panels of the same six validation
images (one per shape) before training and after every epoch: how each variant's
gradient and Soft Pullbacks change as it trains (``train_seconds`` includes these logs,
the same work for every variant).

    python examples/soft_training_study.py             # the study (about 10 minutes on a 2-core CPU)
    python examples/soft_training_study.py --quick     # smoke run (seconds)
    tensorboard --logdir runs/soft_training_study
"""

from __future__ import annotations

import argparse
import csv
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from sp_lightning import Gradient, SemanticPullbackCallback, SoftBackwardTraining, SoftPullback
from sp_lightning.data import ShapesDataModule
from sp_lightning.demo import LOCALISATION_METRICS, torch_threads
from sp_lightning.metrics import ExplanationScores, FaithfulnessCorrelation, MetricFactory, RandomLogit
from sp_lightning.metrics.base import evaluating
from sp_lightning.models import ImageClassifier

VARIANTS: dict[str, dict[str, Any] | None] = {
    "standard": None,
    "soft_constant": {},
    "soft_annealed": {"schedule": {"kind": "cosine", "tau_end": 0.05}},
}
EXPLAINERS = ("gradient", "sp")
QUALITY = ("pointing", "mass", "faithfulness", "random_logit")
METRICS = ("accuracy", "cosine_grad_sp", *(f"{q}_{e}" for q in QUALITY for e in EXPLAINERS))


def quality_metrics(num_classes: int) -> dict[str, MetricFactory]:
    """The explanation metrics of the study, by the names in :data:`QUALITY`."""
    return {
        **LOCALISATION_METRICS,
        "faithfulness": lambda explainer: FaithfulnessCorrelation(explainer.model),
        "random_logit": lambda explainer: RandomLogit(explainer.model, explainer, num_classes=num_classes),
    }


def measure(model: nn.Module, batches: Iterable[Sequence[Tensor]], num_classes: int) -> dict[str, float]:
    """Every measure of :data:`METRICS` over ``(images, labels, masks)`` batches (the model's modes are kept)."""
    device = next(model.parameters()).device
    scores = ExplanationScores(dict(zip(EXPLAINERS, (Gradient(model), SoftPullback(model)))), quality_metrics(num_classes))
    correct, cosines = [], []
    for images, labels, masks in batches:
        images, labels = images.to(device), labels.to(device)
        with evaluating(model):
            correct.append((model(images).argmax(dim=1) == labels).float())
        maps = scores.update(images, labels, masks)
        cosines.append(F.cosine_similarity(*(maps[name].flatten(1) for name in EXPLAINERS), dim=1))
    result = {"accuracy": torch.cat(correct).mean().item(), "cosine_grad_sp": torch.cat(cosines).mean().item()}
    for explainer, values in scores.compute().items():
        result.update({f"{quality}_{explainer}": value for quality, value in values.items()})
    return {name: result[name] for name in METRICS}


class StudyMeasures(Callback):
    """Logs :func:`measure`: on the validation split after every validation (``study/<measure>``),
    on the test split when training ends (``final/<measure>``, also kept in ``final``).

    ``train_seconds`` is the training time up to that last measurement.
    """

    def __init__(self) -> None:
        self.final: dict[str, float] = {}
        self.train_seconds = 0.0
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        datamodule = trainer.datamodule
        for name, value in measure(pl_module, datamodule.val_dataloader(), datamodule.num_classes).items():
            pl_module.log(f"study/{name}", value)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_seconds = time.perf_counter() - self._start
        datamodule = trainer.datamodule
        self.final = measure(pl_module, datamodule.test_dataloader(), datamodule.num_classes)
        for logger in trainer.loggers:
            logger.log_metrics({f"final/{name}": value for name, value in self.final.items()}, step=trainer.global_step)


def train_variant(name: str, args: argparse.Namespace, data: ShapesDataModule) -> dict[str, Any]:
    """Train one variant with the shared seed, data order and budget; return its row of the table."""
    pl.seed_everything(args.seed, verbose=False)  # the same initial weights for every variant
    model = ImageClassifier(data.num_classes, backbone="small_cnn", lr=args.lr, scheduler="cosine")
    settings = VARIANTS[name]
    measures = StudyMeasures()
    callbacks: list[Callback] = [measures, SemanticPullbackCallback(num_images=data.num_classes)]
    if settings is not None:
        callbacks.insert(0, SoftBackwardTraining(**settings))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=1,
        logger=TensorBoardLogger(args.out, name=name, version=""),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.quick,
        num_sanity_val_steps=0,
        log_every_n_steps=1 if args.quick else 10,  # the quick run has 2 steps: log them
    )
    trainer.fit(model, datamodule=data)
    return {"variant": name, **measures.final, "train_seconds": measures.train_seconds}


def write_tables(rows: list[dict[str, Any]], out: Path, chance: dict[str, float]) -> str:
    """Write results.csv and results.md under ``out``; return the markdown.

    ``chance`` holds ``accuracy`` (one over the number of classes) and ``object``
    (the mean share of the image inside the mask: what a random map scores on
    pointing and mass).
    """
    columns = ["variant", *METRICS, "train_seconds"]
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [row["variant"]] + [f"{row[c]:.3f}" for c in METRICS] + [f"{row['train_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\nChance level: accuracy {chance['accuracy']:.3f}; pointing and mass {chance['object']:.3f} "
        "(share of the image inside the mask); faithfulness 0 (higher is better); "
        "random_logit: lower is better (1 = the same map whatever the class)."
    )
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    return table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--train-size", type=int, default=2048, help="training images per epoch")
    parser.add_argument("--probe", type=int, default=64, help="validation images measured after every epoch")
    parser.add_argument("--test-size", type=int, default=512, help="test images of the final table")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0, help="initial weights, data and data order")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--accelerator", default="auto", help="Lightning accelerator (cpu, gpu, auto)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch (as the demo's --threads)")
    parser.add_argument("--out", type=Path, default=Path("runs/soft_training_study"))
    parser.add_argument("--quick", action="store_true", help="tiny budget, for a smoke test")
    args = parser.parse_args(argv)
    for name in ("epochs", "train_size", "probe", "test_size", "batch_size", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.quick:
        args.epochs, args.train_size, args.probe, args.test_size, args.image_size = 1, 64, 8, 16, 32
    return args


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Run the study; returns one row per variant (the numbers of the table)."""
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    data = ShapesDataModule(
        image_size=args.image_size,
        train_size=args.train_size,
        val_size=args.probe,
        test_size=args.test_size,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    with torch_threads(args.threads), warnings.catch_warnings():
        # Shapes are drawn in vectorised batches in the main process: loader workers would not help.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        rows = [train_variant(name, args, data) for name in args.variants]
    object_share = torch.cat([masks.flatten(1).float().mean(dim=1) for _, _, masks in data.test_dataloader()])
    chance = {"accuracy": 1.0 / data.num_classes, "object": object_share.mean().item()}
    table = write_tables(rows, args.out, chance)
    print(table)
    print(f"\nTables: {args.out / 'results.md'}, {args.out / 'results.csv'}.  Charts: tensorboard --logdir {args.out}")
    return rows


if __name__ == "__main__":
    main()
