"""A generic image classifier LightningModule around any backbone from :func:`build_backbone`."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from .backbones import SMALL_CNN, build_backbone

OptimizerName = Literal["adamw", "sgd"]
SchedulerName = Literal["none", "cosine"]


def split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """(images, labels) from a batch that is a tuple/list starting with them (extra items, e.g. masks, are ignored)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        "ImageClassifier expects batches of (images, labels, ...) as a tuple or list, "
        f"got {type(batch).__name__}. Make the dataset return (image, label) pairs."
    )


class ImageClassifier(LightningModule):
    """Image classification with cross-entropy, accuracy metrics and standard optimiser options.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc``.

    Args:
        num_classes: classes the head predicts (the CLI links it to the DataModule's ``num_classes``).
        backbone: ``"small_cnn"``, ``"timm:<name>"`` or ``"torchvision:<name>"``.
        pretrained: start from the library's pretrained weights (needs them cached or internet access).
        small_input: adapt a ResNet-style stem (3x3 conv, no max-pool) to small images such as CIFAR's 32x32.
        backbone_kwargs: extra constructor arguments for the backbone (e.g. ``{img_size: 64, patch_size: 8}``).
        optimizer: ``"adamw"`` or ``"sgd"`` (with Nesterov momentum).
        lr: learning rate.
        weight_decay: weight decay (decoupled for AdamW).
        momentum: SGD momentum.
        scheduler: ``"none"`` (constant) or ``"cosine"`` (per-step cosine decay to 0 over the whole run).
        label_smoothing: cross-entropy label smoothing.
    """

    def __init__(
        self,
        num_classes: int,
        backbone: str = SMALL_CNN,
        pretrained: bool = False,
        small_input: bool = False,
        backbone_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerName = "adamw",
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        momentum: float = 0.9,
        scheduler: SchedulerName = "none",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}.")
        if scheduler not in ("none", "cosine"):
            raise ValueError(f"scheduler must be 'none' or 'cosine', got {scheduler!r}.")
        if not lr > 0 or not weight_decay >= 0 or not 0 <= momentum < 1 or not 0 <= label_smoothing < 1:
            raise ValueError(
                "Need lr > 0, weight_decay >= 0, 0 <= momentum < 1 and 0 <= label_smoothing < 1; got "
                f"lr={lr}, weight_decay={weight_decay}, momentum={momentum}, label_smoothing={label_smoothing}."
            )
        self.save_hyperparameters()
        self.backbone = build_backbone(backbone, num_classes, pretrained, small_input, backbone_kwargs)
        # Keyed "<stage>_acc": a bare "train" key would clash with nn.Module.train.
        self.accuracy = nn.ModuleDict(
            {f"{stage}_acc": MulticlassAccuracy(num_classes=int(num_classes), average="micro") for stage in ("train", "val", "test")}
        )

    def forward(self, images: Tensor) -> Tensor:
        """Logits (B, num_classes)."""
        return self.backbone(images)

    def _step(self, batch: Any, stage: str) -> Tensor:
        images, labels = split_batch(batch)
        logits = self(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.hparams.label_smoothing)
        metric = self.accuracy[f"{stage}_acc"]
        metric(logits.detach(), labels)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=not on_step)
        self.log(f"{stage}/acc", metric, on_step=False, on_epoch=True, prog_bar=True)
        return loss

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        """Class probabilities for a batch of images (or of (images, ...) tuples)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=1)

    def configure_optimizers(self) -> torch.optim.Optimizer | OptimizerLRSchedulerConfig:
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.momentum > 0
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return optimizer
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
