"""Single-point explainers: Gradient, Soft/Double Pullback, and their smoothed forms (docs/method.md section 3)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import SoftRules
from .base import Explainer, LogitsFn


class Gradient(Explainer):
    """Plain input gradient of the target logit (hard rules): the baseline."""

    def __init__(self, model: nn.Module, logits_fn: LogitsFn | None = None) -> None:
        super().__init__(model, SoftRules.hard(), logits_fn)


class SoftPullback(Explainer):
    """Soft Pullback: the backward of the target logit with soft rules.

    Args:
        temperatures: rule name -> temperature (``None`` switches a rule off); documented defaults otherwise.
        **options: engine options, e.g. ``maxpool_padding="zeros"``.
    """

    def __init__(
        self,
        model: nn.Module,
        temperatures: Mapping[str, Any] | SoftRules | None = None,
        logits_fn: LogitsFn | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, SoftRules.coerce(temperatures, **options), logits_fn)


class DoublePullback(SoftPullback):
    """Soft Pullback evaluated at ``x + alpha * SP(x)`` (no normalisation of the first step)."""

    def __init__(
        self,
        model: nn.Module,
        alpha: float = 2.0,
        temperatures: Mapping[str, Any] | SoftRules | None = None,
        logits_fn: LogitsFn | None = None,
        **options: Any,
    ) -> None:
        super().__init__(model, temperatures, logits_fn, **options)
        self.alpha = float(alpha)

    def _attribute(self, inputs: Tensor, targets: Tensor) -> Tensor:
        batch, count = targets.shape
        first = self.pullback(inputs, targets)  # (B, T, ...), one forward for all T
        moved = (inputs.unsqueeze(1) + self.alpha * first).flatten(0, 1)
        second = self.pullback(moved, targets.reshape(-1, 1))
        return second.reshape(batch, count, *inputs.shape[1:])


class SmoothPullback(SoftPullback):
    """Mean Soft Pullback over ``n`` draws of ``x + N(0, sigma^2)``.

    Noise comes from a generator seeded with ``seed`` at every call (the global
    RNG is never used), so the same inputs give the same explanation.
    ``noise_batch`` noisy copies of the batch share one forward.
    """

    def __init__(
        self,
        model: nn.Module,
        n: int = 50,
        sigma: float = 0.15,
        temperatures: Mapping[str, Any] | SoftRules | None = None,
        logits_fn: LogitsFn | None = None,
        seed: int = 0,
        noise_batch: int = 8,
        **options: Any,
    ) -> None:
        super().__init__(model, temperatures, logits_fn, **options)
        if int(n) < 1 or int(noise_batch) < 1:
            raise ValueError(f"n and noise_batch must be >= 1, got n={n}, noise_batch={noise_batch}.")
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}.")
        self.n, self.sigma, self.seed, self.noise_batch = int(n), float(sigma), int(seed), int(noise_batch)

    def _attribute(self, inputs: Tensor, targets: Tensor) -> Tensor:
        generator = torch.Generator(device=inputs.device).manual_seed(self.seed)
        total = None
        done = 0
        while done < self.n:
            copies = min(self.noise_batch, self.n - done)
            noise = torch.randn(
                (copies, *inputs.shape), generator=generator, device=inputs.device, dtype=inputs.dtype
            )
            noisy = (inputs.unsqueeze(0) + self.sigma * noise).flatten(0, 1)
            grads = self.pullback(noisy, targets.repeat(copies, 1))
            chunk = grads.unflatten(0, (copies, inputs.shape[0])).sum(0)
            total = chunk if total is None else total + chunk
            done += copies
        return total / self.n


class SmoothGrad(SmoothPullback):
    """SmoothGrad: SmoothPullback with hard rules (mean gradient over noisy copies)."""

    def __init__(
        self,
        model: nn.Module,
        n: int = 50,
        sigma: float = 0.15,
        logits_fn: LogitsFn | None = None,
        seed: int = 0,
        noise_batch: int = 8,
    ) -> None:
        super().__init__(model, n, sigma, SoftRules.hard(), logits_fn, seed, noise_batch)
