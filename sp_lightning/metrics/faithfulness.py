"""Faithfulness metrics: does removing what the attribution calls important change the output? (docs/method.md section 6).

All four are batched: the perturbed copies of a batch are built with tensor ops
(masks from ranks or block indices, no loops over pixels or patches) and sent through
the model ``batch_size`` at a time. Their defaults are the paper's settings for
3x224x224 inputs in [-1, 1], Quantus 0.6.0 semantics included; how each one scales
to other input sizes is stated in its docstring. Scores depend on the attribution
only up to a positive factor, so there is no normalisation option (Quantus's
``normalise`` does not change them either).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..explainers.base import TargetLike
from .base import (
    ExplanationMetric,
    _wide,
    block_ids,
    evaluating,
    group_sums,
    pearson,
    rank_steps,
    scaled_patch,
    scaled_step,
    spearman,
)

Baseline = float | Literal["uniform"]


def _check_baseline(baseline: Baseline, uniform_range: tuple[float, float]) -> None:
    if baseline != "uniform" and (isinstance(baseline, bool) or not isinstance(baseline, (int, float))):
        raise ValueError(f"baseline must be a number or 'uniform', got {baseline!r}.")
    if len(uniform_range) != 2 or not uniform_range[0] < uniform_range[1]:
        raise ValueError(f"uniform_range must be (low, high) with low < high, got {uniform_range!r}.")


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int (or None for the paper's default), got {value!r}.")


def _ranked_steps(
    x: Tensor, a: Tensor, abs: bool, features_in_step: int | None, descending: bool
) -> tuple[Tensor, Tensor, int, Tensor]:
    """Flat inputs (B, F), each element's step (B, F), the number of steps, and each step's attribution sum (B, S).

    Elements are ranked by (absolute) attribution; ``None`` steps keep the paper's 48 steps.
    """
    batch = x.shape[0]
    flat_x, flat_a = x.reshape(batch, -1), a.reshape(batch, -1)
    if abs:
        flat_a = flat_a.abs()
    step = features_in_step or scaled_step(3136, flat_x.shape[1])
    steps_of, count = rank_steps(flat_a, step, descending)
    return flat_x, steps_of, count, group_sums(flat_a, steps_of, count)


class _RemovalCorrelation(ExplanationMetric):
    """Remove one group of input elements at a time (set it to ``baseline``); correlate attribution sums with logit drops."""

    def __init__(self, model: nn.Module, baseline: float, abs: bool, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        _check_baseline(float(baseline), (0.0, 1.0))
        self.baseline, self.abs = float(baseline), bool(abs)

    def _score_removals(self, x: Tensor, targets: Tensor, groups: Tensor, count: int, sums: Tensor) -> None:
        """``groups`` (B or 1, F): each flat element's group; ``sums`` (B, count): each group's attribution."""
        batch = x.shape[0]
        flat_x, groups = x.reshape(batch, -1), groups.expand(batch, -1)

        def build(index: Tensor) -> Tensor:
            sample, removed = index % batch, index // batch
            out = torch.where(groups[sample] == removed[:, None], self.baseline, flat_x[sample])
            return out.view(-1, *x.shape[1:])

        with evaluating(self.model):
            clean = self._clean_outputs(x, targets)
            perturbed = self._outputs(count * batch, build, targets).view(count, batch).T
        self._record(pearson(sums, clean[:, None] - perturbed))


class FaithfulnessEstimate(_RemovalCorrelation):
    """Faithfulness estimate (Alvarez-Melis & Jaakkola), higher is better.

    Elements (every channel of every pixel) are sorted by descending ``|attribution|``
    and removed ``features_in_step`` at a time: step ``s`` sets only its own elements to
    ``baseline`` (non-cumulative). The score is the Pearson correlation, over the steps,
    between the attribution summed over the step's elements and the drop of the target
    logit. Same as ``quantus.FaithfulnessEstimate(features_in_step=3136, abs=True,
    perturb_baseline=0.0)`` on logits.

    Args:
        features_in_step: elements per step. ``None`` keeps the paper's 48 steps at any
            input size (3136 elements of a 3x224x224 input; ``ceil(numel / 48)`` otherwise).
        baseline: the value removed elements are set to (paper: 0).
        abs: rank and sum ``|attribution|`` (paper) instead of the signed attribution.

        **kwargs: ``logits_fn``, ``batch_size``, ``seed`` (see :class:`ExplanationMetric`), torchmetrics options.

    Cost: ``ceil(numel / features_in_step)`` forward passes per sample (48 by default).
    """

    higher_is_better = True

    def __init__(
        self,
        model: nn.Module,
        features_in_step: int | None = None,
        baseline: float = 0.0,
        abs: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, baseline, abs, **kwargs)
        _check_positive(features_in_step=features_in_step)
        self.features_in_step = features_in_step

    def update(self, inputs: Tensor, attributions: Tensor, target: TargetLike) -> None:
        """Score a batch: inputs (B, ...), attributions shaped like them (or one channel), target int or (B,)."""
        x, a, t = self._prepare(inputs, attributions, target)
        _, steps_of, count, sums = _ranked_steps(x, a, self.abs, self.features_in_step, descending=True)
        self._score_removals(x, t, steps_of, count, sums)


class MonotonicityCorrelation(ExplanationMetric):
    """Monotonicity correlation (Nguyen & Martínez), higher is better.

    Elements are sorted by ascending ``|attribution|`` and perturbed ``features_in_step``
    at a time (non-cumulative), ``samples`` times each. Per step the variance proxy is
    ``mean((p_perturbed - p)^2) / p^2`` with ``p`` the target's **softmax probability**
    (Quantus quirk the paper kept: the model is called with ``softmax=True``; when
    ``|p| < eps`` the division is skipped). The score is the Spearman correlation
    (average ranks for ties) between the steps' attribution sums and those variances.

    ``baseline="uniform"`` replaces a step's elements with **one** value per sample and
    draw, uniform in ``uniform_range`` (Quantus's batched "uniform" baseline), not with
    per-element noise. Same as ``quantus.MonotonicityCorrelation(nr_samples=10,
    features_in_step=3136, perturb_baseline="uniform", perturb_func_kwargs={"uniform_low":
    -1, "uniform_high": 1})`` with ``softmax=True``.

    Args:
        features_in_step: elements per step; ``None`` keeps the paper's 48 steps at any size.
        samples: draws per step (paper: 10).
        baseline: ``"uniform"`` or a fixed value.
        uniform_range: range of the uniform values (the paper's inputs live in [-1, 1]).
        eps: below this probability the squared-probability normalisation is skipped.
        abs: rank and sum ``|attribution|`` (Quantus default, paper).
        softmax: score probabilities (paper) or raw logits.

        **kwargs: ``logits_fn``, ``batch_size``, ``seed`` (see :class:`ExplanationMetric`), torchmetrics options.

    Cost: ``samples * 48`` forward passes per sample by default (480).
    """

    higher_is_better = True

    def __init__(
        self,
        model: nn.Module,
        features_in_step: int | None = None,
        samples: int = 10,
        baseline: Baseline = "uniform",
        uniform_range: tuple[float, float] = (-1.0, 1.0),
        eps: float = 1e-5,
        abs: bool = True,
        softmax: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        _check_positive(features_in_step=features_in_step, samples=samples)
        _check_baseline(baseline, uniform_range)
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps}.")
        self.features_in_step, self.samples = features_in_step, samples
        self.baseline, self.uniform_range = baseline, (float(uniform_range[0]), float(uniform_range[1]))
        self.eps, self.abs, self.softmax = float(eps), bool(abs), bool(softmax)

    def update(self, inputs: Tensor, attributions: Tensor, target: TargetLike) -> None:
        """Score a batch: inputs (B, ...), attributions shaped like them (or one channel), target int or (B,)."""
        x, a, t = self._prepare(inputs, attributions, target)
        batch = x.shape[0]
        flat_x, steps_of, count, sums = _ranked_steps(x, a, self.abs, self.features_in_step, descending=False)
        draws = (count, self.samples, batch)
        if self.baseline == "uniform":
            values = self._uniform(draws, *self.uniform_range, like=flat_x)
        else:
            values = torch.full(draws, float(self.baseline), dtype=flat_x.dtype, device=x.device)

        def build(index: Tensor) -> Tensor:
            sample, pert = index % batch, index // batch
            removed, draw = pert // self.samples, pert % self.samples
            fill = values[removed, draw, sample][:, None]
            out = torch.where(steps_of[sample] == removed[:, None], fill, flat_x[sample])
            return out.view(-1, *x.shape[1:])

        with evaluating(self.model):
            clean = _wide(self._clean_outputs(x, t, self.softmax))
            perturbed = self._outputs(count * self.samples * batch, build, t, self.softmax)
        perturbed = _wide(perturbed).view(count, self.samples, batch)
        scale = torch.where(clean.abs() >= self.eps, 1.0 / clean.abs(), torch.ones_like(clean)) ** 2
        variances = ((perturbed - clean) ** 2).mean(dim=1).T * scale[:, None]
        self._record(spearman(sums, variances))


class FaithfulnessCorrelation(_RemovalCorrelation):
    """Faithfulness correlation, patch variant (docs/method.md section 6), higher is better.

    The image is cut into non-overlapping ``patch_size`` squares (16 blocks of 56x56 on
    224x224). Each block in turn, all channels, is set to ``baseline`` (one block at a
    time); the score is the Pearson correlation over the blocks between the summed
    ``|attribution|`` in the block and the drop of the target logit. Quantus's
    ``FaithfulnessCorrelation`` draws random pixel subsets instead; with
    ``nr_runs=16, subset_size=3*56*56, abs=True, perturb_baseline=0.0`` and its subsets
    set to these blocks it computes the same number.

    Args:
        patch_size: block side; ``None`` scales the paper's 56 to the shorter image side
            (``round(56 * min(H, W) / 224)``, i.e. a 4x4 grid on square images). When a side
            is not a multiple of it, the last blocks are narrower.
        baseline: the value a removed block is set to (paper: 0).
        abs: sum ``|attribution|`` (paper) instead of the signed attribution.

        **kwargs: ``logits_fn``, ``batch_size``, ``seed`` (see :class:`ExplanationMetric`), torchmetrics options.

    Cost: one forward pass per block per sample (16 by default): a cheap default for
    monitoring during training.
    """

    higher_is_better = True

    def __init__(
        self,
        model: nn.Module,
        patch_size: int | None = None,
        baseline: float = 0.0,
        abs: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, baseline, abs, **kwargs)
        _check_positive(patch_size=patch_size)
        self.patch_size = patch_size

    def update(self, inputs: Tensor, attributions: Tensor, target: TargetLike) -> None:
        """Score a batch: inputs (B, C, H, W), attributions shaped like them (or one channel), target int or (B,)."""
        x, a, t = self._prepare(inputs, attributions, target)
        self._require_images(x)
        batch, _, height, width = x.shape
        if self.abs:
            a = a.abs()
        ids, count = block_ids(height, width, self.patch_size or scaled_patch(56, height, width), x.device)
        sums = group_sums(_wide(a).sum(dim=1).reshape(batch, -1), ids.reshape(1, -1), count)
        self._score_removals(x, t, ids.reshape(1, 1, -1).expand(1, x.shape[1], -1).reshape(1, -1), count, sums)


class Infidelity(ExplanationMetric):
    """Infidelity with optimal scaling and square-patch perturbations (docs/method.md section 6), lower is better.

    For each of ``repeats`` rounds and each patch size, the blocks of the image are
    perturbed **cumulatively** (Quantus quirk kept): the j-th perturbation x_j has blocks
    1..j (row-major) replaced, each block (all channels) by one value per sample, uniform
    in ``uniform_range`` with ``baseline="uniform"`` (a new value for every block) or a
    fixed ``baseline``. With a_j = <attribution, x - x_j> and b_j = f_c(x) - f_c(x_j)
    (target logits), beta = sum(a b) / sum(a^2) (beta = sum(a b) when sum(a^2) = 0) and
    the loss is mean_j (beta a_j - b_j)^2. The score averages the loss over patch sizes,
    then rounds. It does not change when the attribution is scaled.

    This is ``quantus.Infidelity(perturb_patch_sizes=[112, 56], n_perturb_samples=5,
    perturb_baseline="uniform", perturb_func_kwargs={"uniform_low": -1, "uniform_high": 1})``
    with the optimal-scaling loss as ``loss_func``: 5 x (4 + 16) = 100 perturbations.

    Args:
        patch_sizes: block sides; ``None`` scales the paper's (112, 56) to the shorter image
            side (``round(s * min(H, W) / 224)``: halves and quarters). Narrower edge blocks
            cover sides that are not multiples.
        repeats: rounds of fresh random values (Quantus ``n_perturb_samples``; paper: 5).
        baseline: ``"uniform"`` or a fixed value.
        uniform_range: range of the uniform values (the paper's inputs live in [-1, 1]).
        abs: use ``|attribution|`` instead of the signed attribution (paper: signed).

        **kwargs: ``logits_fn``, ``batch_size``, ``seed`` (see :class:`ExplanationMetric`), torchmetrics options.

    Cost: ``repeats * sum(blocks)`` forward passes per sample (100 by default).
    """

    higher_is_better = False

    def __init__(
        self,
        model: nn.Module,
        patch_sizes: Sequence[int] | None = None,
        repeats: int = 5,
        baseline: Baseline = "uniform",
        uniform_range: tuple[float, float] = (-1.0, 1.0),
        abs: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(model, **kwargs)
        if patch_sizes is not None:
            if isinstance(patch_sizes, (str, int)) or not len(patch_sizes):
                raise ValueError(f"patch_sizes must be a non-empty list of ints (or None), got {patch_sizes!r}.")
            for size in patch_sizes:
                _check_positive(patch_size=size)
            patch_sizes = [int(size) for size in patch_sizes]
        _check_positive(repeats=repeats)
        _check_baseline(baseline, uniform_range)
        self.patch_sizes, self.repeats, self.baseline = patch_sizes, repeats, baseline
        self.uniform_range, self.abs = (float(uniform_range[0]), float(uniform_range[1])), bool(abs)

    def update(self, inputs: Tensor, attributions: Tensor, target: TargetLike) -> None:
        """Score a batch: inputs (B, C, H, W), attributions shaped like them (or one channel), target int or (B,)."""
        x, a, t = self._prepare(inputs, attributions, target)
        self._require_images(x)
        batch, _, height, width = x.shape
        if self.abs:
            a = a.abs()
        sizes = self.patch_sizes or [scaled_patch(s, height, width) for s in (112, 56)]
        grids = [block_ids(height, width, size, x.device) for size in sizes]
        most = max(count for _, count in grids)
        # values[r, s, k, b]: the value block k of patch size s takes in round r for sample b.
        values = torch.zeros(self.repeats, len(grids), most, batch, dtype=x.dtype, device=x.device)
        for r in range(self.repeats):
            for s, (_, count) in enumerate(grids):
                if self.baseline == "uniform":
                    values[r, s, :count] = self._uniform((count, batch), *self.uniform_range, like=x)
                else:
                    values[r, s, :count] = float(self.baseline)
        maps = torch.stack([ids for ids, _ in grids])
        # One row per perturbation: (round, patch size, last block replaced).
        plan = torch.tensor(
            [(r, s, j) for r in range(self.repeats) for s, (_, count) in enumerate(grids) for j in range(count)],
            device=x.device,
        )

        def build(index: Tensor) -> Tensor:
            sample, (rnd, size, last) = index % batch, plan[index // batch].T
            ids = maps[size]
            fill = values[rnd[:, None, None], size[:, None, None], ids, sample[:, None, None]]
            return torch.where((ids <= last[:, None, None])[:, None], fill[:, None], x[sample])

        with evaluating(self.model):
            clean = _wide(self._clean_outputs(x, t))
            perturbed = _wide(self._outputs(plan.shape[0] * batch, build, t)).view(self.repeats, -1, batch)
        # b_j = f_c(x) - f_c(x_j), as (round, sample, perturbation) for each patch size.
        drops = (clean[:, None] - perturbed.transpose(1, 2)).split([count for _, count in grids], dim=2)
        wide_a = _wide(a)
        products, masses = (wide_a * _wide(x)).sum(dim=1).reshape(batch, -1), wide_a.sum(dim=1).reshape(batch, -1)
        losses = []
        for s, ((ids, count), observed) in enumerate(zip(grids, drops)):
            dot = group_sums(products, ids.reshape(1, -1), count)
            mass = group_sums(masses, ids.reshape(1, -1), count)
            # a_j = <a, x - x_j> summed block by block: block k adds dot_k - value_k * mass_k.
            predicted = (dot - _wide(values[:, s, :count]).transpose(1, 2) * mass).cumsum(dim=2)
            losses.append(self._optimal_scaling_loss(predicted, observed))  # (R, B)
        self._record(torch.stack(losses).mean(dim=0).mean(dim=0))  # patch sizes, then rounds

    @staticmethod
    def _optimal_scaling_loss(predicted: Tensor, observed: Tensor) -> Tensor:
        """mean_j (beta a_j - b_j)^2 with the least-squares beta, over the last dimension."""
        cross = (predicted * observed).sum(dim=-1, keepdim=True)
        energy = (predicted**2).sum(dim=-1, keepdim=True)
        beta = torch.where(energy == 0, cross, cross / torch.where(energy == 0, 1.0, energy))
        return ((beta * predicted - observed) ** 2).mean(dim=-1)
