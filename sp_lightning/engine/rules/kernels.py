"""Soft-rule backward kernels fused into one loop each with ``torch.compile``.

Eager PyTorch runs a soft rule's backward as several full passes over the
activation: the ReLU/GELU rule recomputes x (one pass per term of its recipe),
takes erf, forms ``v + v * erf`` in one ``addcmul`` and multiplies by each
term's scale with the 1/2 folded in, and erf alone costs about twice a plain
ReLU backward on CPU. Compiled, the recompute and ``Phi(z) = (1 + erf(z / sqrt 2)) / 2``
run in one vectorised loop with the product, about a third of the eager time.

On CPU, ``torch.erf`` (an exponential and a division per element) would bound that loop,
so in float32 the kernels take erf from a rational fit instead (:func:`kernel_phi`, derived
by ``benchmarks/fit_gate_erf.py``): a dozen multiply-adds and one division, which leaves
the loop about as fast as the memory it reads (resnet50's five gate kernels: 120-133 ms
against 80-85 ms per call at 2 threads). The gate's absolute error is then at most
2.2e-7 (mean 2e-8; eager ``torch.erf``: 5e-8), exactly 0 and 1 beyond |x / tau| = 5.7,
so no subnormals appear; explanations move by about 1e-6 of their largest value against
the eager code, as they already did from fusion's other roundings. Float64 and other
devices keep ``torch.erf``. The same loop multiplies by the cotangent
and, when x came from frozen eval BatchNorms, hands ``v * gate * scale`` to
each BatchNorm's input directly (``SoftElementwise``): no separate product and
no BatchNorm backward pass.

Compiling costs seconds once per process (more on a machine's first run), so
by default (``SP_LIGHTNING_COMPILE=auto``) a kernel is compiled only after the
eager code has processed ``COMPILE_AFTER_ELEMENTS`` elements through it, like
renting until the rent would have bought the thing: training and repeated
explanations of large models switch within a minute, while a callback
explaining a few small probe images never pays the compile. ``always``
compiles on first use (benchmarks of the steady state), ``never`` stays eager.
Only activations of at least ``MIN_FUSED_NUMEL`` elements count and use the
kernel, and none while a higher-order graph is being recorded. If compiling
fails (no C++ compiler, unsupported device), a warning names the cause and the
eager code is used from then on.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from .recipes import Source, Term

#: Per output cotangent: the scale it is multiplied by (``None``: the cotangent of x itself).
Scales = tuple[Tensor | None, ...]

#: Smallest activation (in elements) worth a compiled kernel.
MIN_FUSED_NUMEL = 1 << 16
#: Eager work (elements, per kernel and process) after which ``auto`` compiles: the eager ReLU gate
#: takes about 2.5 ns per element on one CPU core, so this is a few seconds, as much as compiling.
COMPILE_AFTER_ELEMENTS = 10**9

_SQRT_HALF = math.sqrt(0.5)


def _recompute(terms: tuple[Term, ...]) -> Tensor:
    """x as the sum of its terms (traced into the kernels, so the recompute costs no pass of its own)."""
    x: Tensor | None = None
    for t, scale, shift in terms:
        part = t if scale is None else t * scale + shift
        x = part if x is None else x + part
    assert x is not None
    return x


def emit_cotangents(gv: Tensor, scales: Scales) -> tuple[Tensor, ...]:
    """The cotangent ``gv`` of x, passed on to each term of x (times its scale, if any)."""
    return tuple(gv if scale is None else gv * scale for scale in scales)


def kernel_phi(z: Tensor) -> Tensor:
    """``(1 + erf(z)) / 2`` (Phi of ``z * sqrt 2``) as the compiled kernels compute it: on CPU in float32
    or narrower, ``erf(z) = z * P(z^2) / Q(z^2)`` on |z| <= 4 (coefficients from
    ``benchmarks/fit_gate_erf.py``) and the gate clamped to [0, 1]; ``torch.erf`` elsewhere.
    The coefficients are literals: dynamo would pass module-level floats in as inputs."""
    if z.device.type != "cpu" or z.dtype == torch.float64:
        return 0.5 + 0.5 * torch.erf(z)
    z = z.clamp(-4.0, 4.0)
    t = z * z
    p = ((((((2.12404228e-08 * t - 2.01991793e-06) * t + 0.000140629156) * t + 0.00353208324) * t + 0.0499663502)
          * t + 0.195149422) * t + 1.12837887)
    q = (((0.000924323278 * t + 0.0139741004) * t + 0.113053024) * t + 0.506276786) * t + 1.0
    return (0.5 + 0.5 * (z * p / q)).clamp(0.0, 1.0)


def _phi_of_terms(terms: tuple[Term, ...], k: Tensor) -> Tensor:
    """Phi(x / tau) for x = sum of the terms, k = 1 / (tau * sqrt 2): the traced body of the kernel."""
    return kernel_phi(_recompute(terms) * k)


def _phi_cotangents(terms: tuple[Term, ...], v: Tensor, scales: Scales, k: Tensor) -> tuple[Tensor, ...]:
    """v * Phi(x / tau), passed on to the terms: gate, product and BatchNorm backward in one loop."""
    return emit_cotangents(v * _phi_of_terms(terms, k), scales)


def _gate_cotangents(gate: Tensor, v: Tensor, scales: Scales) -> tuple[Tensor, ...]:
    """v * gate, passed on to the terms, for a gate kept across several backward passes."""
    return emit_cotangents(v * gate, scales)


_POLICIES = frozenset({"auto", "always", "never"})


def compile_policy() -> str:
    """The ``SP_LIGHTNING_COMPILE`` setting: ``auto`` (default), ``always`` or ``never``."""
    policy = os.environ.get("SP_LIGHTNING_COMPILE", "auto").strip().lower()
    if policy not in _POLICIES:
        raise ValueError(
            f"SP_LIGHTNING_COMPILE={policy!r} is not a valid setting; use one of {sorted(_POLICIES)} "
            "(auto: compile soft-rule kernels once they have been used enough to pay off)."
        )
    return policy


_EAGER_BLOCKS = [0]  # how many eager_kernels() blocks are open (process-wide: autograd may use other threads)


@contextmanager
def eager_kernels() -> Iterator[None]:
    """Run the soft rules' kernels eagerly inside the block, without compiling any.

    For a backward batched across targets (``torch.autograd.grad(..., is_grads_batched=True)``
    runs it under a vmap): compiling there fails, and the failure would send every later call
    to the eager code for the rest of the process.
    """
    _EAGER_BLOCKS[0] += 1
    try:
        yield
    finally:
        _EAGER_BLOCKS[0] -= 1


def _batched(x: Tensor) -> bool:
    """Whether kernels must stay eager for ``x``: inside :func:`eager_kernels`, or ``x`` batched by a vmap."""
    return (
        _EAGER_BLOCKS[0] > 0
        or torch._C._functorch.is_legacy_batchedtensor(x)
        or torch._C._functorch.peek_interpreter_stack() is not None
    )


class CompiledKernel:
    """``torch.compile`` of a function under the compile policy; falls back to eager (once warned) on failure."""

    def __init__(self, fn: Callable[..., Any], dynamic: bool = True) -> None:
        self.fn, self.dynamic = fn, dynamic
        self.compiled: Callable[..., Any] | None = None
        self.broken = False
        self.eager_elements = 0  # work done eagerly so far (auto policy)

    def wanted(self, x: Tensor) -> bool:
        """Whether ``x`` goes through the compiled kernel; under ``auto`` counts eager work until it does."""
        policy = compile_policy()
        if self.broken or policy == "never" or x.numel() < MIN_FUSED_NUMEL or not x.is_floating_point():
            return False
        if torch.is_grad_enabled() or torch.compiler.is_compiling() or _batched(x):
            return False
        if self.compiled is None and policy == "auto" and self.eager_elements < COMPILE_AFTER_ELEMENTS:
            self.eager_elements += x.numel()
            return False
        return True

    def maybe(self, x: Tensor, *args: object, scalar: float | None = None) -> Any:
        """``fn(*args[, scalar])`` compiled when :meth:`wanted` says so for input ``x``; ``None`` means
        the caller runs its eager code. The scalar goes in as a 0-dim tensor: a Python float would be
        specialised, and every new temperature would recompile."""
        if not self.wanted(x):
            return None
        if scalar is None:
            return self(*args)
        return self(*args, torch.full((), scalar, dtype=x.dtype, device=x.device))

    def follow(self, *args: object) -> Any:
        """The compiled result for inputs a companion kernel's :meth:`wanted` already admitted (no
        counting of its own); ``None`` once compiling has failed."""
        return None if self.broken else self(*args)

    def __call__(self, *args: object) -> Any:
        """The compiled result, or ``None`` when compiling failed."""
        if self.compiled is None:
            self.compiled = torch.compile(self.fn, dynamic=self.dynamic)
        try:
            return self.compiled(*args)
        except Exception as error:  # compiler missing or backend failure: the eager path is always correct
            self.broken = True
            warnings.warn(
                f"sp_lightning: torch.compile of the soft-rule kernel {self.fn.__name__} failed "
                f"({type(error).__name__}: {error}); using the slower eager code from now on. "
                "Set SP_LIGHTNING_COMPILE=never to skip the attempt.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None


_PHI = CompiledKernel(_phi_of_terms)
_PHI_COTANGENTS = CompiledKernel(_phi_cotangents)
_GATE_COTANGENTS = CompiledKernel(_gate_cotangents)


def fused_phi(source: Source, tau: float) -> Tensor | None:
    """Phi(x / tau) from one compiled kernel, or ``None`` when this input should use the eager gate."""
    terms = source.terms()
    return _PHI.maybe(terms[0][0], terms, scalar=_SQRT_HALF / tau)


def fused_phi_cotangents(source: Source, tau: float, v: Tensor, scales: Scales) -> tuple[Tensor, ...] | None:
    """``v * Phi(x / tau)`` passed on to ``scales`` from one compiled kernel, or ``None`` (eager)."""
    return _PHI_COTANGENTS.maybe(v, source.terms(), v, scales, scalar=_SQRT_HALF / tau)


def fused_gate_cotangents(gate: Tensor, v: Tensor, scales: Scales) -> tuple[Tensor, ...] | None:
    """``v * gate`` passed on to ``scales`` from one compiled kernel, or ``None`` (eager)."""
    return _GATE_COTANGENTS.maybe(v, gate, v, scales)
