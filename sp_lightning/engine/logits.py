"""Reading (B, num_classes) logits from a model: the one reader the explainers, metrics and callback share."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import Tensor, nn

LogitsFn = Callable[[Any], Tensor]


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
        "Pass logits_fn=...: a function mapping the model output to a (B, num_classes) tensor."
    )


def read_logits(
    model: nn.Module,
    inputs: Tensor,
    logits_fn: LogitsFn | None = None,
    around_forward: AbstractContextManager[Any] | None = None,
) -> Tensor:
    """Run ``model(inputs)`` and return its logits, checked to be (B, num_classes).

    Runs the forward as it is (train/eval flags, grad mode and device are the caller's).

    Args:
        model: maps a batch of inputs to logits, or to an output ``logits_fn`` reads them from.
        inputs: a batch (B, ...).
        logits_fn: model output -> (B, num_classes) logits; default :func:`default_logits`.
        around_forward: a context entered for the forward alone (e.g. the engine's mode), not for ``logits_fn``.
    """
    with around_forward if around_forward is not None else nullcontext():
        output = model(inputs)
    logits = (logits_fn or default_logits)(output)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[0] != inputs.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(
            f"Expected logits of shape (B, num_classes) with B = {inputs.shape[0]}, got {shape}. "
            "Pass logits_fn=... to map the model output to logits."
        )
    return logits
