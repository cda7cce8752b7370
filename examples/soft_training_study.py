"""Does soft-backward training make a network more interpretable? (SPEC section 5, open question 3)

Trains the same small CNN on a synthetic shapes dataset whose every image carries
its object's ground-truth mask, once per variant, with the same seed, data order
and budget:

- ``standard``: plain training;
- ``soft_constant``: ``SoftBackwardTraining()`` (default temperatures, held constant);
- ``soft_annealed``: ``SoftBackwardTraining(schedule={"kind": "cosine", "tau_end": 0.05})``,
  annealed toward the plain gradient over the run.

It then compares, on held-out images: accuracy; the cosine between the plain
gradient and the Soft Pullback (SP) toward the true class; and, for both the
gradient and SP, localisation against the masks (pointing game: is the map's
maximum on the object; relevance mass: share of the map inside the mask). The
maps are |attribution| summed over channels. Results go to a markdown and a CSV
table, and to TensorBoard (one run directory per variant, so every tag shows
the variants on one chart, during training and at the end).

    python examples/soft_training_study.py             # the study (a few minutes on a 2-core CPU)
    python examples/soft_training_study.py --quick     # smoke run (seconds)
    tensorboard --logdir runs/soft_training_study
"""

from __future__ import annotations

import argparse
import csv
import math
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from sp_lightning import Gradient, SoftBackwardTraining, SoftPullback

CLASSES = ("disc", "square", "cross", "triangle")
VARIANTS: dict[str, dict[str, Any] | None] = {
    "standard": None,
    "soft_constant": {},
    "soft_annealed": {"schedule": {"kind": "cosine", "tau_end": 0.05}},
}
METRICS = (
    "accuracy",
    "cosine_grad_sp",
    "pointing_gradient",
    "pointing_sp",
    "mass_gradient",
    "mass_sp",
)


# --------------------------------------------------------------------------- data


def _shape(name: str, u: Tensor, v: Tensor) -> Tensor:
    """Mask of shape ``name`` in local coordinates where its circumradius is 1."""
    if name == "disc":
        return u * u + v * v <= 1.0
    if name == "square":
        return torch.maximum(u.abs(), v.abs()) <= 0.72
    if name == "cross":
        return ((u.abs() <= 0.3) & (v.abs() <= 0.95)) | ((v.abs() <= 0.3) & (u.abs() <= 0.95))
    edges = [u * math.cos(a) + v * math.sin(a) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    return torch.stack(edges).amax(0) <= 0.5  # equilateral triangle


def make_shapes(length: int, image_size: int = 32, seed: int = 0, split: str = "train") -> TensorDataset:
    """(image, label, mask) samples: one object shape on a textured background, often a smaller distractor.

    Stand-in for ``sp_lightning.data.ShapesDataset`` (same sample layout: a
    normalised (3, H, W) image, the class index, a (H, W) bool mask of the object).
    """
    g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{split}".encode()))
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, image_size), torch.linspace(-1, 1, image_size), indexing="ij")
    images = torch.empty(length, 3, image_size, image_size)
    labels = torch.randint(0, len(CLASSES), (length,), generator=g)
    masks = torch.empty(length, image_size, image_size, dtype=torch.bool)

    def place(name: str, radius: float) -> Tensor:
        cx, cy = (torch.rand(2, generator=g) * 2 - 1) * (1 - radius)
        angle = float(torch.rand(1, generator=g)) * 2 * math.pi
        u = ((xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)) / radius
        v = (-(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)) / radius
        return _shape(name, u, v)

    for i in range(length):
        base = torch.rand(3, 1, 1, generator=g)
        freq = torch.rand(2, generator=g) * 6
        texture = 0.15 * torch.sin(freq[0] * xs * math.pi + freq[1] * ys * math.pi + float(torch.rand(1, generator=g)) * 6)
        image = base + texture + 0.05 * torch.randn(3, image_size, image_size, generator=g)
        if float(torch.rand(1, generator=g)) < 0.5:  # a smaller distractor of another class
            other = (int(labels[i]) + 1 + int(torch.randint(0, len(CLASSES) - 1, (1,), generator=g))) % len(CLASSES)
            distractor = place(CLASSES[other], 0.25)
            image = torch.where(distractor, torch.rand(3, 1, 1, generator=g), image)
        mask = place(CLASSES[int(labels[i])], 0.35 + 0.2 * float(torch.rand(1, generator=g)))
        colour = (base + 0.5 + 0.3 * torch.rand(3, 1, 1, generator=g)) % 1.0  # contrasts with the background
        images[i] = torch.where(mask, colour, image)
        masks[i] = mask
    return TensorDataset((images - 0.5) / 0.3, labels, masks)


class ShapesData(pl.LightningDataModule):
    """Train/val splits of :func:`make_shapes`; the training order is fixed by ``seed``.

    Stand-in for ``sp_lightning.data.ShapesDataModule``.
    """

    def __init__(
        self, train_size: int = 4096, val_size: int = 1024, image_size: int = 32, batch_size: int = 64, seed: int = 0
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set = make_shapes(train_size, image_size, seed, "train")
        self.val_set = make_shapes(val_size, image_size, seed, "val")

    def train_dataloader(self) -> DataLoader:
        order = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, generator=order)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


# --------------------------------------------------------------------------- model


class StudyCNN(pl.LightningModule):
    """Three conv blocks (BatchNorm, ReLU, max-pool), global average pool, linear head."""

    def __init__(self, num_classes: int = len(CLASSES), lr: float = 2e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
        )  # fmt: skip

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self.backbone(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        self.log("val/accuracy", (self(batch[0]).argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


# --------------------------------------------------------------------------- measurements


def localisation(attribution: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample pointing-game hit and relevance mass in the mask, on |attribution| summed over channels."""
    relevance = attribution.abs().sum(1).flatten(1)
    inside = masks.flatten(1)
    hit = inside.gather(1, relevance.argmax(1, keepdim=True)).squeeze(1).float()
    mass = (relevance * inside).sum(1) / relevance.sum(1).clamp_min(1e-12)
    return hit, mass


def measure(model: nn.Module, images: Tensor, labels: Tensor, masks: Tensor, batch_size: int = 128) -> dict[str, float]:
    """Accuracy, cosine(gradient, SP) and localisation of both, averaged over the given images."""
    scores: dict[str, list[Tensor]] = {name: [] for name in METRICS}
    gradient, pullback = Gradient(model), SoftPullback(model)
    for x, y, m in zip(images.split(batch_size), labels.split(batch_size), masks.split(batch_size)):
        with torch.no_grad():
            scores["accuracy"].append((model(x).argmax(1) == y).float())
        grad, sp = gradient.attribute(x, y), pullback.attribute(x, y)
        scores["cosine_grad_sp"].append(F.cosine_similarity(grad.flatten(1), sp.flatten(1), dim=1))
        for name, attribution in (("gradient", grad), ("sp", sp)):
            hit, mass = localisation(attribution, m)
            scores[f"pointing_{name}"].append(hit)
            scores[f"mass_{name}"].append(mass)
    return {name: torch.cat(values).mean().item() for name, values in scores.items()}


class ProbeMetrics(Callback):
    """Logs the study's measurements on a fixed probe set after every validation, under ``study/``."""

    def __init__(self, probe: TensorDataset) -> None:
        self.probe = probe.tensors

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        for name, value in measure(pl_module, *self.probe).items():
            pl_module.log(f"study/{name}", value)


# --------------------------------------------------------------------------- the study


def train_variant(name: str, args: argparse.Namespace, data: ShapesData) -> StudyCNN:
    """Train one variant with the shared seed, data order and budget."""
    pl.seed_everything(args.seed, verbose=False)
    model = StudyCNN()
    settings = VARIANTS[name]
    callbacks: list[Callback] = [ProbeMetrics(TensorDataset(*(t[: args.probe] for t in data.val_set.tensors)))]
    if settings is not None:
        callbacks.insert(0, SoftBackwardTraining(**settings))
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        deterministic=True,
        logger=TensorBoardLogger(args.out, name=name, version=""),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=10,
    )
    trainer.fit(model, datamodule=data)
    return model


def write_tables(rows: list[dict[str, Any]], out: Path, chance: float) -> str:
    """Write results.csv and results.md under ``out``; return the markdown table.

    ``chance`` (the mean share of the image inside the mask) is what a random
    map scores on both localisation measures.
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
    lines.append(f"\nChance level of pointing and mass (share of the image inside the mask): {chance:.3f}")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    return table


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-size", type=int, default=4096)
    parser.add_argument("--eval-size", type=int, default=1024)
    parser.add_argument("--probe", type=int, default=128, help="validation images measured after every epoch")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=Path("runs/soft_training_study"))
    parser.add_argument("--quick", action="store_true", help="tiny budget, for a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.train_size, args.eval_size, args.probe = 1, 64, 32, 16
    args.out.mkdir(parents=True, exist_ok=True)

    data = ShapesData(args.train_size, args.eval_size, args.image_size, args.batch_size, args.seed)
    rows = []
    for name in args.variants:
        start = time.perf_counter()
        model = train_variant(name, args, data)
        seconds = time.perf_counter() - start
        rows.append({"variant": name, **measure(model.eval(), *data.val_set.tensors), "train_seconds": seconds})
    table = write_tables(rows, args.out, chance=data.val_set.tensors[2].float().mean().item())
    print(table)
    print(f"\nTables: {args.out / 'results.md'}, {args.out / 'results.csv'}.  Charts: tensorboard --logdir {args.out}")
    return rows


if __name__ == "__main__":
    main()
