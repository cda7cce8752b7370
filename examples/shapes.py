"""Train an image classifier on the synthetic shapes with the Python API (no files, no downloads).

    python examples/shapes.py            # a couple of minutes on a laptop CPU
    python examples/shapes.py --tiny     # seconds (the smoke test)
    tensorboard --logdir runs/shapes     # IMAGES tab: the Semantic Pullbacks, epoch by epoch

Batches are ``(images, labels, masks)``: the masks mark each image's object, which
makes the data a test bed for explanations (see ``python -m sp_lightning.demo``).
``SemanticPullbackCallback`` explains ``--probe-images`` fixed validation images (six:
one per shape) before training and after every epoch: Soft Pullbacks toward the true
shape and its rivals, the gradient, and Pullback Ascent counterfactuals.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from sp_lightning import SemanticPullbackCallback
from sp_lightning.data import ShapesDataModule
from sp_lightning.models import ImageClassifier


def main(argv: Sequence[str] | None = None) -> Trainer:
    parser = argparse.ArgumentParser(description="A small CNN on the synthetic shapes.")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--logdir", default="runs/shapes", help="where logs and checkpoints go")
    parser.add_argument("--probe-images", type=int, default=6, help="images SemanticPullbackCallback explains")
    parser.add_argument("--tiny", action="store_true", help="a few tiny batches (smoke test)")
    args = parser.parse_args(argv)
    seed_everything(0)
    sizes = dict(image_size=32, train_size=32, val_size=16, test_size=16) if args.tiny else dict(train_size=2048)
    data = ShapesDataModule(batch_size=32, **sizes)
    model = ImageClassifier(data.num_classes, backbone="small_cnn", lr=3e-3, scheduler="cosine")
    trainer = Trainer(
        max_epochs=1 if args.tiny else args.epochs,
        default_root_dir=args.logdir,
        logger=TensorBoardLogger(args.logdir),
        callbacks=[SemanticPullbackCallback(num_images=args.probe_images)],
    )
    trainer.fit(model, data)
    trainer.test(model, data)
    return trainer


if __name__ == "__main__":
    main()
