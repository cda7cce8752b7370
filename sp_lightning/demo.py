"""The shapes demo (``make demo`` / ``python -m sp_lightning.demo``): train, then check where explanations point.

A small CNN learns the synthetic shapes for a few epochs (Lightning's progress
bar shows it) while ``SemanticPullbackCallback`` logs explanations of a fixed set
of validation images to TensorBoard. Afterwards every validation image is
explained toward its true class with the plain gradient and with the Soft
Pullback, and the summary reports how often each explanation's strongest pixel
lies on the object (pointing game) and what share of its relevance falls on the
object (relevance mass), using the dataset's ground-truth masks.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from .data import ShapesDataModule
from .callbacks import SemanticPullbackCallback
from .explainers import Explainer, Gradient, SoftPullback
from .metrics import ExplanationScores, MetricFactory, PointingGame, RelevanceMass
from .models import ImageClassifier
from .tensorboard_server import tensorboard_command


@dataclass(frozen=True)
class Localisation:
    """How well one explainer's relevance sits on the object, averaged over images."""

    pointing: float  # share of images whose most relevant pixel is on the object
    mass: float  # mean share of relevance that falls on the object


#: The two mask metrics, keyed by :class:`Localisation`'s field names.
LOCALISATION_METRICS: dict[str, MetricFactory] = {
    "pointing": lambda explainer: PointingGame(explainer.model),
    "mass": lambda explainer: RelevanceMass(explainer.model),
}


def localisation(loader: DataLoader, explainers: Mapping[str, Explainer]) -> dict[str, Localisation]:
    """Pointing game and relevance mass of each explainer over ``loader``'s (images, labels, masks) batches.

    Relevance is the absolute attribution summed over channels, scored with
    :class:`~sp_lightning.metrics.PointingGame` and :class:`~sp_lightning.metrics.RelevanceMass`
    (through :class:`~sp_lightning.metrics.ExplanationScores`).
    """
    scores = ExplanationScores(explainers, LOCALISATION_METRICS)
    for images, labels, masks in loader:
        scores.update(images, labels, masks)
    return {name: Localisation(**values) for name, values in scores.compute().items()}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sp_lightning.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--train-size", type=int, default=2048, help="training images per epoch")
    parser.add_argument("--val-size", type=int, default=512, help="validation images")
    parser.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--logdir", default="runs/demo", help="TensorBoard log directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (this small CNN gains little from more, and one thread stays fast "
        "when other programs share the CPU)",
    )
    parser.add_argument("--tiny", action="store_true", help="a few seconds' run (smoke test)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.tiny:
        args.epochs, args.train_size, args.val_size, args.image_size = 1, 64, 32, 32
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    """Run the demo; returns the numbers it prints (``accuracy``, ``localisation``, ``logdir``)."""
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` intra-op CPU threads for torch; the previous count comes back afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run(args: argparse.Namespace) -> dict[str, object]:
    """Train, explain, and print the summary (see :func:`main`)."""
    start = time.perf_counter()
    seed_everything(args.seed, verbose=False)
    datamodule = ShapesDataModule(
        image_size=args.image_size,
        train_size=args.train_size,
        val_size=args.val_size,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    model = ImageClassifier(datamodule.num_classes, backbone="small_cnn", lr=3e-3, scheduler="cosine")
    logger = TensorBoardLogger(args.logdir, name="shapes")
    # Explanations of 8 validation images, logged to TensorBoard at the start and after every epoch;
    # it reads class names, mean and std from the datamodule.
    callbacks: list[Callback] = [SemanticPullbackCallback()]
    trainer = Trainer(
        max_epochs=args.epochs,
        accelerator="auto",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
    )
    with warnings.catch_warnings():
        # Shapes are drawn in vectorised batches in the main process: loader workers would not help.
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(model, datamodule)
    accuracy = float(trainer.callback_metrics["val/acc"])
    explainers = {"gradient": Gradient(model), "soft pullback": SoftPullback(model)}
    scores = localisation(datamodule.val_dataloader(), explainers)
    object_share = float(torch.stack([s.mask.float().mean() for s in datamodule.val_set]).mean())

    chance = 1.0 / datamodule.num_classes
    print(f"\nValidation accuracy: {accuracy:.1%} ({datamodule.num_classes} shape classes, chance {chance:.1%})")
    print(
        f"Do explanations point at the object? ({len(datamodule.val_set)} validation images; "
        f"the object covers {object_share:.1%} of an image on average)"
    )
    print(f"  {'explanation':<15}{'pointing game':>15}{'relevance on object':>22}")
    for name, score in scores.items():
        print(f"  {name:<15}{score.pointing:>15.1%}{score.mass:>22.1%}")
    print(f"Done in {time.perf_counter() - start:.0f} s. Explore the run:  {tensorboard_command(args.logdir)}")
    return {"accuracy": accuracy, "localisation": scores, "object_share": object_share, "logdir": logger.log_dir}


if __name__ == "__main__":
    main()
