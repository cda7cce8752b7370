"""The probe set and what is computed on it: selection, input space, explanations (no Trainer needed)."""

from .explain import METRICS, REDUCTIONS, ExplainSettings, Explanations, Reduction, explain_probe, reduce_channels
from .input_space import InputSpace, resolve_input_space
from .selection import BatchFn, ProbeSet, default_batch_fn, select_probe

__all__ = [
    "METRICS",
    "REDUCTIONS",
    "BatchFn",
    "ExplainSettings",
    "Explanations",
    "InputSpace",
    "ProbeSet",
    "Reduction",
    "default_batch_fn",
    "explain_probe",
    "reduce_channels",
    "resolve_input_space",
    "select_probe",
]
