"""Tiny models, data and a hand-written soft-gradient step shared by the soft-training tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils.data import DataLoader, TensorDataset

from sp_lightning.engine import SoftBackwardMode


def active_relu_tau() -> float | None:
    """The ReLU temperature of the soft mode active right now (``None`` when no soft mode is active)."""
    modes = [m for m in _get_current_function_mode_stack() if isinstance(m, SoftBackwardMode)]
    return modes[-1].rules.tau("relu") if modes else None


class TinyMLP(pl.LightningModule):
    """4 -> 8 -> 3 ReLU MLP, plain SGD. ``training_step`` calls ``self.net`` directly, not ``forward``.

    It records the loss and the soft ReLU temperature seen inside every training
    step, and whether any soft mode was active in validation/test/predict steps.
    """

    def __init__(self, lr: float = 0.5, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 3))
        self.lr = lr
        self.losses: list[Tensor] = []
        self.step_taus: list[float | None] = []
        self.eval_modes: list[float | None] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.step_taus.append(active_relu_tau())
        loss = F.cross_entropy(self.net(x), y)
        self.losses.append(loss.detach().clone())
        return loss

    def _eval_step(self, batch: Any) -> Tensor:
        self.eval_modes.append(active_relu_tau())
        return self(batch[0])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch)

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._eval_step(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class SmallCNN(TinyMLP):
    """Conv-ReLU-MaxPool-Linear on 1x8x8 images (the MLP's bookkeeping, a CNN body)."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__(lr=lr)
        self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64, 3))


class BatchNormCNN(SmallCNN):
    """Conv-BatchNorm-ReLU(in place)-MaxPool-Linear: the soft ReLU recomputes x from the batch statistics."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__(lr=lr)
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(64, 3),
        )


def cnn_data(n: int = 16, seed: int = 7) -> TensorDataset:
    """Deterministic 1x8x8 images and labels in 3 classes."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def mlp_data(n: int = 16, seed: int = 0) -> TensorDataset:
    """Deterministic inputs (n, 4) and labels (n,) in 3 classes."""
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 4, generator=g) * 2, torch.randint(0, 3, (n,), generator=g))


def loader(data: TensorDataset, batch_size: int = 8) -> DataLoader:
    """In-order loader (no shuffling: the same batches in every run)."""
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def trainer(**kwargs: Any) -> pl.Trainer:
    """A quiet CPU trainer; keyword arguments override the defaults."""
    options: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
    )
    options.update(kwargs)
    return pl.Trainer(**options)


def mlp_grads(weights: Sequence[Tensor], x: Tensor, y: Tensor, tau: float | None) -> list[Tensor]:
    """Hand-computed gradients of mean cross-entropy for a Linear-ReLU-Linear net with ``weights`` [W1, b1, W2, b2].

    The backward through the ReLU uses Phi(h / tau) (the soft rule, docs/method.md section 2)
    or, with ``tau=None``, the hard gate 1[h > 0]. Returns [dW1, db1, dW2, db2].
    """
    w1, b1, w2, b2 = (p.detach() for p in weights)
    h = x @ w1.T + b1
    a = h.clamp_min(0)
    logits = a @ w2.T + b2
    g = (logits.softmax(dim=1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / x.shape[0]
    gate = (h > 0).to(h.dtype) if tau is None else 0.5 * torch.erfc(-h / (tau * 2**0.5))
    dh = (g @ w2) * gate
    return [dh.T @ x, dh.sum(0), g.T @ a, g.sum(0)]
