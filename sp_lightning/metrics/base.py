"""What every explanation-quality metric shares (docs/method.md section 6).

Each metric is a ``torchmetrics.Metric``: ``update(inputs, attributions, target, ...)``
appends one score per sample to a list state that torchmetrics concatenates across
DDP ranks, ``compute()`` returns their mean (NaN scores, where a score is undefined,
are left out with a warning) and :meth:`ExplanationMetric.per_sample_scores` returns
the scores themselves, synced the same way.

The model is *borrowed*, not owned: it is not registered as a submodule, so
``metric.to(...)`` does not move it and ``state_dict()`` does not contain its weights.
Every model call runs in eval mode under ``torch.no_grad()``; each submodule's
train/eval flag is restored afterwards (also after an error), and calls made from
inside ``torch.inference_mode()`` (Lightning validation) work. Random draws come from
a ``torch.Generator`` the metric owns (``seed``); the global RNGs are never touched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from ..engine import LogitsFn, read_logits, suspended
from ..explainers.base import Explainer, TargetLike, normalize_target

#: Side of the inputs the paper's patch sizes and step sizes refer to (docs/method.md section 6).
REFERENCE_SIDE = 224
#: Elements of the inputs the paper's step sizes refer to (3 x 224 x 224).
REFERENCE_NUMEL = 3 * REFERENCE_SIDE * REFERENCE_SIDE


def scaled_patch(size_at_224: int, height: int, width: int) -> int:
    """The paper's patch side for 224x224 inputs, scaled to the shorter side of these inputs."""
    return max(1, round(size_at_224 * min(height, width) / REFERENCE_SIDE))


def scaled_step(features_at_224: int, numel: int) -> int:
    """Elements per step that keep the paper's number of steps (e.g. 3136 of 150528 = 48 steps)."""
    return max(1, math.ceil(numel * features_at_224 / REFERENCE_NUMEL))


def block_ids(height: int, width: int, patch: int, device: torch.device) -> tuple[Tensor, int]:
    """Row-major index of the ``patch`` x ``patch`` block holding each pixel, and the number of blocks.

    Blocks tile the image from the top-left corner; when a side is not a multiple of
    ``patch`` the last row/column of blocks is narrower (the image is never padded).
    """
    rows = torch.arange(height, device=device) // patch
    cols = torch.arange(width, device=device) // patch
    per_row = -(-width // patch)
    ids = rows[:, None] * per_row + cols[None, :]
    return ids, int(ids.max()) + 1


def rank_steps(values: Tensor, step: int, descending: bool) -> tuple[Tensor, int]:
    """Step index of every element when each row is sorted and cut into runs of ``step`` elements.

    Returns a LongTensor shaped like ``values`` (B, F) and the number of steps. Ties keep
    their original order (stable sort).
    """
    count = values.shape[1]
    order = torch.argsort(values, dim=1, descending=descending, stable=True)
    positions = torch.arange(count, device=values.device).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, positions)
    return ranks // step, math.ceil(count / step)


def group_sums(values: Tensor, groups: Tensor, count: int) -> Tensor:
    """Row-wise sums of ``values`` (B, F) per group index in ``groups`` (B, F) or (1, F), as (B, count), wide."""
    wide = _wide(values)
    out = torch.zeros(values.shape[0], count, dtype=wide.dtype, device=values.device)
    return out.scatter_add_(1, groups.expand_as(values), wide)


def _wide(t: Tensor) -> Tensor:
    """``t`` in float64 where the device supports it (MPS does not), else float32."""
    return t.to(torch.float32 if t.device.type == "mps" else torch.float64)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation of two (B, N) tensors; NaN where a row is constant."""
    a, b = _wide(a), _wide(b)
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    corr = (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))
    return corr.clamp(-1.0, 1.0)


def average_ranks(values: Tensor) -> Tensor:
    """Row-wise ranks (1-based) with ties given their average rank, as in ``scipy.stats.rankdata``."""
    below = (values[:, None, :] < values[:, :, None]).sum(dim=2)
    equal = (values[:, None, :] == values[:, :, None]).sum(dim=2)
    return _wide(below) + (_wide(equal) + 1.0) / 2.0


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Spearman rank correlation of two (B, N) tensors (average ranks for ties)."""
    return pearson(average_ranks(a), average_ranks(b))


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no autograd for plain forward passes; every submodule's mode restored on exit.

    Enabled soft-backward handles are suspended: they never change a forward value,
    only the cost of computing it.
    """
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        with torch.no_grad(), suspended(model):
            yield
    finally:
        for module, training in modes:
            module.training = training


class ExplanationMetric(Metric):
    """Base class: a borrowed model, chunked forward passes, an owned generator, per-sample scores.

    Args:
        model: the classifier whose explanations are scored.
        logits_fn: maps the model output to (B, num_classes) logits; default reads a tensor,
            the first item of a tuple, ``["logits"]`` or ``.logits``.
        batch_size: most (perturbed) inputs per model call; lower it to save memory.
        seed: seed of the metric's own random generator.
        **kwargs: ``torchmetrics.Metric`` options (e.g. ``sync_on_compute``).
    """

    is_differentiable = False
    full_state_update = False
    higher_is_better: bool | None = None
    sample_scores: list[Tensor]

    def __init__(
        self,
        model: nn.Module,
        logits_fn: LogitsFn | None = None,
        batch_size: int = 64,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not isinstance(model, nn.Module):
            raise TypeError(f"Metrics need the model as a torch.nn.Module, got {type(model).__name__}.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int (inputs per model call), got {batch_size!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
        # Borrowed, not registered: .to() must not move it and state_dict() must not hold its weights.
        self.__dict__["model"] = model
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError("logits_fn must be callable: model output -> (B, num_classes) logits.")
        self._logits_fn = logits_fn
        self.batch_size = batch_size
        self.seed = seed
        self._generator: torch.Generator | None = None
        self.add_state("sample_scores", default=[], dist_reduce_fx="cat")

    # ------------------------------------------------------------------ results

    def compute(self) -> Tensor:
        """Mean score over all samples seen (and all ranks); NaN scores are left out with a warning."""
        scores = self._all_scores()
        undefined = int(torch.isnan(scores).sum())
        if undefined:
            rank_zero_warn(
                f"{type(self).__name__}: {undefined} of {scores.numel()} per-sample scores are NaN "
                "(the score is undefined for them, e.g. a constant attribution or an empty mask); "
                "the mean leaves them out. See per_sample_scores()."
            )
        return scores.nanmean()

    def per_sample_scores(self) -> Tensor:
        """Every sample's score in update order (rank 0's samples first under DDP)."""
        with self.sync_context(should_sync=self._to_sync, should_unsync=self._should_unsync):
            return self._all_scores().clone()

    def _all_scores(self) -> Tensor:
        """The score state as one tensor (a list before syncing, one tensor after)."""
        state = self.sample_scores
        if isinstance(state, Tensor) or state:
            return dim_zero_cat(state)
        return torch.empty(0, device=self.device)

    def _record(self, scores: Tensor) -> None:
        self.sample_scores.append(scores.detach().to(torch.float32))

    # ------------------------------------------------------------------ randomness

    def reseed(self, seed: int | None = None) -> None:
        """Restart the random stream (from ``seed``, default the constructor's) to replay the same draws."""
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be an int, got {type(seed).__name__}.")
            self.seed = seed
        self._generator = None

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator

    def _uniform(self, shape: tuple[int, ...], low: float, high: float, like: Tensor) -> Tensor:
        """Uniform draws in [low, high) from the metric's generator (all random values pass here)."""
        out = torch.empty(shape, dtype=like.dtype, device=like.device)
        return out.uniform_(low, high, generator=self._generator_on(like.device))

    def _randint(self, high: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """Integers in [0, high) from the metric's generator."""
        return torch.randint(high, shape, generator=self._generator_on(device), device=device)

    # ------------------------------------------------------------------ model calls

    def _prepare(
        self, inputs: Tensor, attributions: Tensor, target: TargetLike, same_shape: bool = False, expand: bool = True
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Validated inputs, attributions (broadcast to the inputs' shape if ``expand``), and targets (B,)."""
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() < 2:
            raise TypeError("inputs must be a floating-point tensor (B, ...) with a batch dimension.")
        if not isinstance(attributions, Tensor) or not attributions.is_floating_point():
            raise TypeError("attributions must be a floating-point tensor, e.g. an explainer's output.")
        if attributions.device != inputs.device:
            raise ValueError(
                f"attributions are on {attributions.device} but inputs on {inputs.device}; move them to one device."
            )
        if same_shape and attributions.shape != inputs.shape:
            raise ValueError(
                f"{type(self).__name__} compares attributions with the explainer's output, so they must be shaped "
                f"like the inputs {tuple(inputs.shape)}; got {tuple(attributions.shape)}. Pass the raw explainer output."
            )
        if attributions.dim() == inputs.dim() - 1:
            attributions = attributions.unsqueeze(1)  # (B, H, W) -> (B, 1, H, W)
        try:
            expanded = attributions.expand(inputs.shape)
        except RuntimeError:
            raise ValueError(
                f"attributions of shape {tuple(attributions.shape)} do not fit inputs of shape "
                f"{tuple(inputs.shape)}: use the inputs' shape, or one channel (B, 1, H, W) / (B, H, W)."
            ) from None
        targets, single = normalize_target(target, inputs.shape[0], inputs.device)
        if not single:
            raise ValueError("These metrics score one target per input: pass target as an int or a (B,) tensor.")
        return inputs.detach(), (expanded if expand else attributions).detach(), targets[:, 0]

    def _require_images(self, inputs: Tensor) -> None:
        if inputs.dim() != 4:
            raise ValueError(
                f"{type(self).__name__} works on images: inputs must be (B, C, H, W), got {tuple(inputs.shape)}."
            )

    def _logits(self, inputs: Tensor) -> Tensor:
        """(B, num_classes) logits of a plain forward (shape checked by the engine's reader)."""
        return read_logits(self.model, inputs, self._logits_fn)

    def _outputs(
        self, count: int, build: Callable[[Tensor], Tensor], targets: Tensor, softmax: bool = False
    ) -> Tensor:
        """Target logits (or probabilities) of ``count`` inputs built ``batch_size`` at a time.

        ``build(index)`` returns the inputs for the flat indices ``index``; index ``i``
        belongs to sample ``i % B`` (perturbation-major layout), whose target is used.
        """
        batch = targets.shape[0]
        chunks = []
        for start in range(0, count, self.batch_size):
            index = torch.arange(start, min(count, start + self.batch_size), device=targets.device)
            logits = self._logits(build(index))
            if start == 0:
                self._check_targets(targets, logits.shape[1])
            if softmax:
                logits = logits.softmax(dim=1)
            chunks.append(logits.gather(1, targets[index % batch, None])[:, 0])
        return torch.cat(chunks)

    def _clean_outputs(self, inputs: Tensor, targets: Tensor, softmax: bool = False) -> Tensor:
        """Target logits (or probabilities) of the unperturbed inputs."""
        return self._outputs(inputs.shape[0], lambda index: inputs[index], targets, softmax)

    @staticmethod
    def _check_targets(targets: Tensor, num_classes: int) -> None:
        if int(targets.min()) < 0 or int(targets.max()) >= num_classes:
            raise ValueError(
                f"target indices must lie in [0, {num_classes - 1}] for a model with {num_classes} classes; "
                f"got values in [{int(targets.min())}, {int(targets.max())}]."
            )


class ExplainerMetric(ExplanationMetric):
    """A metric that re-runs an explainer (from :mod:`sp_lightning.explainers`) on new inputs or targets."""

    def __init__(self, model: nn.Module, explainer: Explainer, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        if not isinstance(explainer, Explainer):
            raise TypeError(
                f"explainer must be an sp_lightning explainer (e.g. SoftPullback(model)), got {type(explainer).__name__}."
            )
        if explainer.model is not model:
            raise ValueError("explainer explains a different model than the one given to the metric; build it on `model`.")
        self.explainer = explainer

    def _explain(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """The explainer's attributions of ``inputs`` toward ``targets`` (B,)."""
        return self.explainer.attribute(inputs, targets)
