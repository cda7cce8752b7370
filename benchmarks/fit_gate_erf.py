"""Derives the rational erf of the compiled gate kernels (``sp_lightning/engine/rules/kernels.py``).

    .venv/bin/python benchmarks/fit_gate_erf.py

On CPU, ``torch.erf`` (an exponential and a division per element) bounds the fused
ReLU/GELU gate kernel: about 7.5 ms on an (8, 256, 56, 56) activation at 2 threads,
where a plain ReLU backward's pass over the same memory takes about 4.5 ms. The
kernel therefore uses ``erf(z) = z * P(z^2) / Q(z^2)`` on ``|z| <= 4``, ``P`` of degree 6 and
``Q`` of degree 4: a dozen multiply-adds and one division, about 5.2 ms.

The fit: ``x * P(t) - erf(x) * Q(t)`` (``t = x^2``, ``Q(0) = 1``) by weighted linear least
squares in float64 on [0, 3.8], dividing by the previous ``Q`` and reweighting by the
previous error (Lawson's iteration toward the minimax fit). The coefficients are then
rounded to float32. This prints them and the gate's error ``Phi(z) = (1 + erf(z / sqrt 2)) / 2``
in float32, clamped to [0, 1] as the kernel does, against float64 on [-6, 6].
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sp_lightning.engine.rules.kernels import kernel_phi  # noqa: E402

FIT_END = 3.8  # erf(3.8) = 1 - 7.7e-8: beyond, float32 rounds erf to 1 within an ulp
DEGREES = (6, 4)


def fit(p_degree: int, q_degree: int, end: float, rounds: int = 300) -> tuple[list[float], list[float], float]:
    """(P's coefficients, Q's coefficients, lowest first; max abs error of the float64 fit)."""
    x = torch.linspace(0, end, 40001, dtype=torch.float64)[1:]
    t, f = (x * x) / (end * end), torch.special.erf(x)  # t scaled to [0, 1] for conditioning
    weight, q = torch.ones_like(x), torch.ones_like(x)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    for _ in range(rounds):
        basis = torch.cat([x[:, None] * t[:, None] ** torch.arange(p_degree + 1),
                           -f[:, None] * t[:, None] ** torch.arange(1, q_degree + 1)], 1)
        w = weight.sqrt() / q
        sol = torch.linalg.lstsq(basis * w[:, None], (f * w)[:, None]).solution[:, 0]
        p_c, q_c = sol[: p_degree + 1], torch.cat([sol.new_ones(1), sol[p_degree + 1 :]])
        q = sum(c * t**i for i, c in enumerate(q_c))
        error = x * sum(c * t**i for i, c in enumerate(p_c)) / q - f
        worst = float(error.abs().max())
        if best is None or worst < best[0]:
            scale = end * end
            best = (worst, p_c / scale ** torch.arange(p_degree + 1), q_c / scale ** torch.arange(q_degree + 1))
        weight = (weight * error.abs() / error.abs().mean()).clamp_min(1e-12)
        weight /= weight.sum()
    assert best is not None
    worst, p_c, q_c = best
    return [float(c) for c in p_c.float()], [float(c) for c in q_c.float()], worst


def main() -> None:
    p_c, q_c, worst = fit(*DEGREES, FIT_END)
    print(f"float64 fit on [0, {FIT_END}]: max |error| {worst:.2e}")
    print("P:", ", ".join(f"{c:.9g}" for c in p_c))
    print("Q:", ", ".join(f"{c:.9g}" for c in q_c))
    z = torch.linspace(-6, 6, 2_000_001)
    exact = (1 + torch.special.erf(z.double())) / 2
    error = (kernel_phi(z).double() - exact).abs()
    aten = ((0.5 + 0.5 * torch.erf(z)).double() - exact).abs()
    print(f"kernel's Phi in float32 (embedded coefficients): max |error| {error.max():.2e}, mean {error.mean():.2e}; "
          f"with torch.erf: max {aten.max():.2e}, mean {aten.mean():.2e}")


if __name__ == "__main__":
    main()
