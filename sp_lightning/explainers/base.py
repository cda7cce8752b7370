"""What every explainer shares: one call shape and a promise to leave no trace.

``attribute(inputs, target)`` takes inputs (B, ...) and a target that is an int,
a LongTensor (B,) or a LongTensor (B, T). It returns a tensor shaped like the
inputs, or (B, T, ...) for T targets per input, computed with one forward for
all T targets. The objective is the raw target logit (docs/method.md section 3).

Gradients are taken with ``torch.autograd.grad`` with respect to a copy of the
inputs, so parameters' ``.grad`` never changes. The model runs in eval mode and
every submodule's mode is restored; the global RNG state is restored; calls
from inside ``torch.inference_mode()`` or ``torch.no_grad()`` work.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..engine import LogitsFn, SoftBackwardMode, SoftRules, default_logits, eager_kernels, explaining, read_logits

TargetLike = int | Tensor

#: Layers that take (B, C, H, W) and would read a 3-D input as one unbatched image.
_IMAGE_LAYERS = (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


class NonFiniteWarning(UserWarning):
    """Inputs or attributions hold NaN or Inf values: the explanation is not meaningful there."""


def normalize_target(target: TargetLike, batch: int, device: torch.device) -> tuple[Tensor, bool]:
    """Targets as a fresh LongTensor (B, T), plus whether the caller passed a single target per input."""
    if isinstance(target, bool) or not isinstance(target, (int, Tensor)):
        raise TypeError(f"target must be an int or an integer tensor of shape (B,) or (B, T), got {type(target).__name__}.")
    if isinstance(target, int):
        return torch.full((batch, 1), target, dtype=torch.long, device=device), True
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}.")
    if target.dim() == 0:
        return target.reshape(1, 1).expand(batch, 1).to(device=device, dtype=torch.long), True
    if target.dim() > 2 or target.shape[0] != batch:
        raise ValueError(
            f"target must have shape (B,) or (B, T) with B = {batch} (the batch size), got {tuple(target.shape)}."
        )
    if target.dim() == 2 and target.shape[1] == 0:
        raise ValueError(
            f"target has shape {tuple(target.shape)}: no target class for any input. "
            "Pass at least one class index per input, shape (B,) or (B, T) with T >= 1."
        )
    single = target.dim() == 1
    return (target.reshape(batch, -1) if single else target).to(device=device, dtype=torch.long).clone(), single


def warn_if_not_finite(t: Tensor, what: str) -> None:
    """Warn (:class:`NonFiniteWarning`) when ``t`` holds NaN or Inf values."""
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        warnings.warn(
            f"sp_lightning: the {what} hold {bad} NaN/Inf value(s) of {t.numel()}; "
            + ("the explanation of those samples is not meaningful." if what == "inputs" else
               "check the inputs, the model's numerics (e.g. half precision) and the temperatures."),
            NonFiniteWarning,
            stacklevel=3,
        )


class Explainer:
    """Base of all explainers: the (soft or hard) pullback of target logits.

    Args:
        model: maps a batch of inputs to logits (or to an output ``logits_fn`` reads logits from).
        rules: which soft rules the backward uses (``SoftRules.hard()`` is the plain gradient).
        logits_fn: maps the model output to (B, num_classes) logits; default :func:`default_logits`.

    Attributes:
        batch_targets: for T > 1 targets per input, ``True`` pulls all T back in one batched
            backward pass (:func:`batched_pullback`), ``False`` runs one backward per target after the
            same shared forward (it needs no ``torch.vmap`` support from the backward of a model's own
            ``autograd.Function``s). ``None`` (default): batched on accelerators, where one large
            backward beats T small ones; per target on the CPU, where the batched pass measured
            slower (it cannot use the compiled kernels; benchmarks/RESULTS.md).
    """

    def __init__(self, model: nn.Module, rules: SoftRules, logits_fn: LogitsFn | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Explainers need a torch.nn.Module, got {type(model).__name__}.")
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError("logits_fn must be callable: model output -> (B, num_classes) logits.")
        self.model = model
        self.rules = replace(rules, param_grads=False)  # only input gradients are ever taken
        self.logits_fn = logits_fn or default_logits
        self.batch_targets: bool | None = None

    def attribute(self, inputs: Tensor, target: TargetLike) -> Tensor:
        """Explanation shaped like ``inputs`` (or (B, T, ...) for (B, T) targets)."""
        with self._session():
            targets, single = self._targets(inputs, target)
            result = self._attribute(inputs.detach().clone(), targets)
        warn_if_not_finite(result, "attributions")
        return result[:, 0] if single else result

    def _attribute(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """(B, T, ...) explanations; subclasses override (inputs are a fresh copy)."""
        return self.pullback(inputs, targets)

    # ------------------------------------------------------------------ shared machinery

    def _targets(self, inputs: Tensor, target: TargetLike) -> tuple[Tensor, bool]:
        """Check the inputs (and warn about NaN/Inf in them); targets as (B, T) plus the single flag."""
        if not isinstance(inputs, Tensor) or inputs.dim() < 1 or not inputs.is_floating_point():
            raise TypeError("inputs must be a floating-point tensor with a leading batch dimension.")
        if inputs.shape[0] == 0:
            raise ValueError(f"inputs hold no samples (shape {tuple(inputs.shape)}): pass at least one input.")
        if inputs.dim() == 3:
            layer = next((m for m in self.model.modules() if isinstance(m, _IMAGE_LAYERS)), None)
            if layer is not None:
                raise ValueError(
                    f"inputs have shape {tuple(inputs.shape)}: one image (C, H, W) without its batch dimension? "
                    f"The model's {type(layer).__name__} layers take (B, C, H, W) and would read the channels "
                    "as the batch. Pass inputs.unsqueeze(0) for one image (the explainers need the batch dim B)."
                )
        warn_if_not_finite(inputs, "inputs")
        return normalize_target(target, inputs.shape[0], inputs.device)

    def _session(self) -> AbstractContextManager[None]:
        """Everything an explanation run needs around it, undone on exit (see ``engine.session``)."""
        return explaining(self.model)

    def logits(self, inputs: Tensor, rules: SoftRules | None = None) -> Tensor:
        """Forward with this explainer's rules (or ``rules``); returns (B, C) logits."""
        rules = self.rules if rules is None else rules
        mode = SoftBackwardMode(rules) if rules.any_active else None
        return read_logits(self.model, inputs, self.logits_fn, around_forward=mode)

    def pullback(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """(B, T, ...) pullbacks of the T target logits at ``inputs``, sharing one forward."""
        x = inputs.detach().requires_grad_(True)
        count = targets.shape[1]
        # Several targets pull back through one graph: each rule derives its gate once, not per target.
        # The model gets a copy of x, so a forward that edits its input in place works (x stays the leaf).
        logits = self.logits(x.clone(), replace(self.rules, keep_derived=count > 1))
        num_classes = logits.shape[1]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise ValueError(
                f"target indices must lie in [0, {num_classes - 1}] for a model with {num_classes} classes; "
                f"got values in [{int(targets.min())}, {int(targets.max())}]."
            )
        selected = logits.gather(1, targets)
        batched = self.batch_targets if self.batch_targets is not None else x.device.type != "cpu"
        if count > 1 and batched:
            try:
                return batched_pullback(selected, x)
            except RuntimeError as error:  # e.g. a model's own autograd.Function whose backward vmap cannot run
                warnings.warn(
                    f"sp_lightning: the batched backward over {count} targets failed ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else ''}); using one backward per target. "
                    "Set explainer.batch_targets = False to skip the attempt.",
                    RuntimeWarning,
                    stacklevel=3,
                )
        grads = [
            torch.autograd.grad(selected[:, t].sum(), x, retain_graph=t < count - 1)[0] for t in range(count)
        ]
        return torch.stack(grads, dim=1)


def batched_pullback(selected: Tensor, x: Tensor) -> Tensor:
    """(B, T, ...) pullbacks of the columns of ``selected`` (B, T) to ``x`` in ONE backward pass.

    The T one-hot cotangents (T, B, T) travel through the graph together as a batch
    (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``torch.vmap`` over the
    backward): each backward op runs once on a T-times larger cotangent instead of T
    times, which is what pays on a GPU, where T small launches cost more than one big one.
    Record the graph with ``keep_derived=True``: each soft rule then derives its gate once,
    as a plain tensor, and multiplies the cotangents into a fresh tensor, which vmap batches
    (without it, a rule may multiply a cotangent into its gate in place, which vmap refuses).

    Args:
        selected: the target logits, (B, T), from a forward on ``x``.
        x: the leaf the pullbacks are taken with respect to.

    Returns:
        (B, T, *x.shape[1:]): the same values as T separate backward passes (within float tolerance).

    Example:
        >>> x = torch.tensor([[1.0, 2.0]], requires_grad=True)
        >>> batched_pullback(torch.stack([x[:, 0] * x[:, 1], 3 * x[:, 1]], dim=1), x)
        tensor([[[2., 1.],
                 [0., 3.]]])
    """
    count = selected.shape[1]
    one_hot = torch.eye(count, dtype=selected.dtype, device=selected.device)
    cotangents = one_hot[:, None, :].expand(count, selected.shape[0], count)
    # The graph is kept so that the caller can fall back to T separate passes if vmap fails.
    with eager_kernels():  # nothing can be compiled under the vmap
        (grads,) = torch.autograd.grad(selected, x, cotangents, retain_graph=True, is_grads_batched=True)
    return grads.transpose(0, 1).contiguous()
