"""A timm vision transformer (ViT-Tiny or PVT-v2-b0, random init) on the synthetic shapes.

    python examples/timm_vit.py --arch vit     # ViT-Tiny, 8x8 patches on 64x64 images
    python examples/timm_vit.py --arch pvt     # PVT-v2-b0 (spatial-reduction attention)
    python examples/timm_vit.py --tiny         # two tiny batches (smoke test)
    tensorboard --logdir runs/timm             # IMAGES tab: the Semantic Pullbacks, epoch by epoch

Any timm model works the same way: ``ImageClassifier(backbone="timm:<name>",
backbone_kwargs={...})`` passes the keyword arguments to ``timm.create_model``.
Transformers learn slowly from scratch on small data; expect lower accuracy
than the small CNN for the same budget. ``SemanticPullbackCallback`` explains
``--probe-images`` fixed validation images (six: one per shape) before training and
after every epoch; its soft rules reach the attention layers (fused attention included).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from sp_lightning import SemanticPullbackCallback
from sp_lightning.data import ShapesDataModule
from sp_lightning.models import ImageClassifier

ARCHS = {"vit": "timm:vit_tiny_patch16_224", "pvt": "timm:pvt_v2_b0"}


def main(argv: Sequence[str] | None = None) -> Trainer:
    parser = argparse.ArgumentParser(description="A timm transformer on the synthetic shapes.")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="vit")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--logdir", default="runs/timm", help="where logs and checkpoints go")
    parser.add_argument("--probe-images", type=int, default=6, help="images SemanticPullbackCallback explains")
    parser.add_argument("--tiny", action="store_true", help="two tiny batches (smoke test)")
    args = parser.parse_args(argv)
    seed_everything(0)
    size = 32 if args.tiny else args.image_size
    data = ShapesDataModule(image_size=size, batch_size=4 if args.tiny else 64)
    # ViTs are built for one input size: give it ours, with 8x8 patches. PVT-v2 takes any size.
    kwargs = {"img_size": size, "patch_size": 8} if args.arch == "vit" else {}
    model = ImageClassifier(
        data.num_classes,
        backbone=ARCHS[args.arch],
        backbone_kwargs=kwargs,
        lr=1e-3,
        weight_decay=0.05,
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
