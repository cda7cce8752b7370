"""CIFAR-10 with a torchvision ResNet-18 (random init, stem adapted to 32x32 images).

    python examples/cifar10_resnet.py --download           # fetch CIFAR-10 into ./data, then train
    python examples/cifar10_resnet.py --data-dir /datasets # an existing cifar-10-batches-py/ folder
    python examples/cifar10_resnet.py --tiny               # two tiny batches (smoke test)
    tensorboard --logdir runs/cifar10                      # scalars, and the explanations under IMAGES

SGD with Nesterov momentum, weight decay 5e-4 and a cosine schedule: the usual
CIFAR ResNet recipe. Train on a GPU for real runs (Lightning picks it up).
``SemanticPullbackCallback`` explains ``--probe-images`` fixed validation images (ten:
one per class) before training and after every epoch, so TensorBoard shows how the
Soft Pullbacks and counterfactuals of the same images sharpen as the network learns.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from sp_lightning import SemanticPullbackCallback
from sp_lightning.data import CIFAR10DataModule
from sp_lightning.models import ImageClassifier


def main(argv: Sequence[str] | None = None) -> Trainer:
    parser = argparse.ArgumentParser(description="ResNet-18 on CIFAR-10.")
    parser.add_argument("--data-dir", default="data", help="folder holding (or receiving) cifar-10-batches-py/")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 when missing (needs internet)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    parser.add_argument("--num-workers", type=int, default=4)
    parser.add_argument("--logdir", default="runs/cifar10", help="where logs and checkpoints go")
    parser.add_argument("--probe-images", type=int, default=10, help="images SemanticPullbackCallback explains")
    parser.add_argument("--tiny", action="store_true", help="two tiny batches (smoke test)")
    args = parser.parse_args(argv)
    seed_everything(0)
    data = CIFAR10DataModule(
        data_dir=args.data_dir,
        download=args.download,
        batch_size=4 if args.tiny else args.batch_size,
        num_workers=0 if args.tiny else args.num_workers,
        val_size=args.val_size,
    )
    model = ImageClassifier(
        data.num_classes,
        backbone="torchvision:resnet18",
        small_input=True,
        optimizer="sgd",
        lr=0.1,
        weight_decay=5e-4,
        scheduler="cosine",
    )
    # --tiny: two batches of each loop in one epoch
    budget = dict(max_epochs=1, limit_train_batches=2, limit_val_batches=2, limit_test_batches=2)
    trainer = Trainer(
        **(budget if args.tiny else dict(max_epochs=args.epochs)),
        default_root_dir=args.logdir,
        logger=TensorBoardLogger(args.logdir),
        callbacks=[SemanticPullbackCallback(num_images=args.probe_images)],
    )
    trainer.fit(model, data)
    trainer.test(model, data)
    return trainer


if __name__ == "__main__":
    main()
