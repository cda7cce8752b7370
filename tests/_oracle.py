"""An oracle for the coverage report that shares no code with the engine.

A ``TorchDispatchMode`` sees the aten kernels a plain forward runs, below every
Python-level way of writing an op (modules, functionals, Tensor methods,
hand-written attention). It counts the gated ones per category; the engine's
coverage report of the same forward must account for each of them, softened,
switched off or flagged as uncovered. Report entries the oracle cannot see at
aten level (RMSNorm, instance norm and local response norm decompose into
plain arithmetic) are left out of the comparison.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

#: aten op (overload packet name) -> category.
_ATEN: dict[str, str] = {
    **dict.fromkeys(("relu", "relu_"), "relu"),
    **dict.fromkeys(("gelu", "gelu_"), "gelu"),
    **dict.fromkeys(("silu", "silu_"), "silu"),
    **dict.fromkeys(("mish", "mish_"), "mish"),
    **dict.fromkeys(("hardswish", "hardswish_"), "hardswish"),
    **dict.fromkeys(("hardsigmoid", "hardsigmoid_"), "hardsigmoid"),
    **dict.fromkeys(("leaky_relu", "leaky_relu_"), "leaky_relu"),
    **dict.fromkeys(("hardtanh", "hardtanh_"), "hardtanh"),
    **dict.fromkeys(("elu", "elu_"), "elu"),  # SELU runs as a scaled ELU
    **dict.fromkeys(("celu", "celu_"), "celu"),
    **dict.fromkeys(("max_pool2d_with_indices", "max_pool2d"), "maxpool"),  # 1-D max pooling runs as 2-D
    **dict.fromkeys(("max_pool3d_with_indices", "max_pool3d"), "max_pool3d"),
    "adaptive_max_pool2d": "adaptive_max_pool",
    "adaptive_max_pool3d": "adaptive_max_pool",
    "fractional_max_pool2d": "fractional_max_pool",
    "fractional_max_pool3d": "fractional_max_pool",
    "native_layer_norm": "layernorm",
    "native_group_norm": "groupnorm",
    "_softmax": "attention",
    "_safe_softmax": "attention",  # SDPA's math fallback (e.g. for transposed, non-contiguous q/k/v)
    "_scaled_dot_product_flash_attention_for_cpu": "attention",
    "_scaled_dot_product_flash_attention": "attention",
    "_scaled_dot_product_efficient_attention": "attention",
    "_scaled_dot_product_cudnn_attention": "attention",
    "_prelu_kernel": "prelu",
    "rrelu_with_noise": "rrelu",
    "threshold": "threshold",
    "hardshrink": "hardshrink",
    "softshrink": "softshrink",
}

#: Names in the coverage report -> category (rule names map to themselves).
_REPORT: dict[str, str] = {
    "selu": "elu",
    "max_pool1d": "maxpool",
    "adaptive_max_pool1d": "adaptive_max_pool",
    "adaptive_max_pool2d": "adaptive_max_pool",
    "adaptive_max_pool3d": "adaptive_max_pool",
    "fractional_max_pool2d": "fractional_max_pool",
    "fractional_max_pool3d": "fractional_max_pool",
}
CATEGORIES = frozenset(_ATEN.values())


class GatedOpCounter(TorchDispatchMode):
    """Counts gated aten kernels per category."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        category = _ATEN.get(func.overloadpacket.__name__)
        if category is not None:
            self.counts[category] += 1
        return func(*args, **(kwargs or {}))


def gated_ops(model: nn.Module, inputs: Tensor) -> Counter[str]:
    """Gated aten ops of one plain eval-mode forward that records a graph (train flags restored)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        leaf = inputs.detach().clone().requires_grad_(True)
        with torch.enable_grad(), GatedOpCounter() as counter:
            model(leaf.clone())
    finally:
        for module, training in modes:
            module.training = training
    return counter.counts


def report_categories(report: Any) -> Counter[str]:
    """The coverage report's softened + switched-off + uncovered counts per oracle category."""
    counts: Counter[str] = Counter()
    for group in (report.softened, report.switched_off, report.uncovered):
        for name, count in group.items():
            category = "attention" if name.startswith("softmax") else _REPORT.get(name, name)
            if category in CATEGORIES:
                counts[category] += count
    return counts


def mismatch(model: nn.Module, inputs: Tensor, report: Any) -> dict[str, tuple[int, int]]:
    """category -> (oracle count, report count) wherever they differ; empty when the report saw every gated op."""
    seen, reported = gated_ops(model, inputs), report_categories(report)
    return {c: (seen[c], reported[c]) for c in sorted(set(seen) | set(reported)) if seen[c] != reported[c]}
