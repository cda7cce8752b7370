"""What every explainer shares: one call shape and a promise to leave no trace.

``attribute(inputs, target)`` takes inputs (B, ...) and a target that is an int,
a LongTensor (B,) or a LongTensor (B, T). It returns a tensor shaped like the
inputs, or (B, T, ...) for T targets per input, computed with one forward for
all T targets. The objective is the raw target logit (SPEC section 3).

Gradients are taken with ``torch.autograd.grad`` with respect to a copy of the
inputs, so parameters' ``.grad`` never changes. The model runs in eval mode and
every submodule's mode is restored; the global RNG state is restored; calls
from inside ``torch.inference_mode()`` or ``torch.no_grad()`` work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..context import soft_backward, suspended
from ..rules.config import SoftRules

LogitsFn = Callable[[Any], Tensor]
TargetLike = int | Tensor


def default_logits(output: Any) -> Tensor:
    """Read logits from a model output: a tensor, the first item of a tuple/list, ``["logits"]`` or ``.logits``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(getattr(output, "logits", None), Tensor):
        return output.logits
    raise TypeError(
        f"Cannot read logits from a model output of type {type(output).__name__}. "
        "Pass logits_fn=... to the explainer: a function mapping the model output to a (B, num_classes) tensor."
    )


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
    single = target.dim() == 1
    return (target.reshape(batch, -1) if single else target).to(device=device, dtype=torch.long).clone(), single


@contextmanager
def preserved_state(model: nn.Module, devices: list[int]) -> Iterator[None]:
    """Eval mode, grad on, RNG forked; every submodule's mode restored on exit (also after errors)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode(False), torch.enable_grad():
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training


class Explainer:
    """Base of all explainers: the (soft or hard) pullback of target logits.

    Args:
        model: maps a batch of inputs to logits (or to an output ``logits_fn`` reads logits from).
        rules: which soft rules the backward uses (``SoftRules.hard()`` is the plain gradient).
        logits_fn: maps the model output to (B, num_classes) logits; default :func:`default_logits`.
    """

    def __init__(self, model: nn.Module, rules: SoftRules, logits_fn: LogitsFn | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Explainers need a torch.nn.Module, got {type(model).__name__}.")
        if logits_fn is not None and not callable(logits_fn):
            raise TypeError("logits_fn must be callable: model output -> (B, num_classes) logits.")
        self.model = model
        self.rules = replace(rules, param_grads=False)  # only input gradients are ever taken
        self.logits_fn = logits_fn or default_logits

    def attribute(self, inputs: Tensor, target: TargetLike) -> Tensor:
        """Explanation shaped like ``inputs`` (or (B, T, ...) for (B, T) targets)."""
        with self._session():
            targets, single = self._targets(inputs, target)
            result = self._attribute(inputs.detach().clone(), targets)
        return result[:, 0] if single else result

    def _attribute(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """(B, T, ...) explanations; subclasses override (inputs are a fresh copy)."""
        return self.pullback(inputs, targets)

    # ------------------------------------------------------------------ shared machinery

    def _targets(self, inputs: Tensor, target: TargetLike) -> tuple[Tensor, bool]:
        if not isinstance(inputs, Tensor) or inputs.dim() < 1 or not inputs.is_floating_point():
            raise TypeError("inputs must be a floating-point tensor with a leading batch dimension.")
        return normalize_target(target, inputs.shape[0], inputs.device)

    def _session(self) -> ExitStack:
        """Everything an explanation run needs around it, undone on exit."""
        stack = ExitStack()
        devices = sorted({p.device.index or 0 for p in self.model.parameters() if p.device.type == "cuda"})
        stack.enter_context(preserved_state(self.model, devices))
        stack.enter_context(suspended(self.model))
        return stack

    def logits(self, inputs: Tensor, rules: SoftRules | None = None) -> Tensor:
        """Forward with this explainer's rules (or ``rules``); returns (B, C) logits."""
        rules = self.rules if rules is None else rules
        with soft_backward(self.model, rules) if rules.any_active else nullcontext():
            output = self.model(inputs)
        logits = self.logits_fn(output)
        if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != inputs.shape[0]:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"Expected logits of shape (B, num_classes) with B = {inputs.shape[0]}, got {shape}. "
                "Pass logits_fn=... to map the model output to logits."
            )
        return logits

    def pullback(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """(B, T, ...) pullbacks of the T target logits at ``inputs``, sharing one forward."""
        x = inputs.detach().requires_grad_(True)
        count = targets.shape[1]
        # Several targets pull back through one graph: each rule derives its gate once, not per target.
        logits = self.logits(x, replace(self.rules, keep_derived=count > 1))
        num_classes = logits.shape[1]
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
            raise ValueError(
                f"target indices must lie in [0, {num_classes - 1}] for a model with {num_classes} classes; "
                f"got values in [{int(targets.min())}, {int(targets.max())}]."
            )
        selected = logits.gather(1, targets)
        grads = [
            torch.autograd.grad(selected[:, t].sum(), x, retain_graph=t < count - 1)[0] for t in range(count)
        ]
        return torch.stack(grads, dim=1)


def soft_rules(temperatures: Mapping[str, Any] | SoftRules | None, options: dict[str, Any]) -> SoftRules:
    """SoftRules from an explainer's ``temperatures`` and keyword options."""
    if isinstance(temperatures, SoftRules):
        return temperatures
    return SoftRules.create(temperatures, **options)
