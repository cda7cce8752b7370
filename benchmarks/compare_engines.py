"""A/B of two checkouts of the engine: Soft Pullback time (1 target and T=4), interleaved in one process.

    git worktree add /tmp/base <rev>
    .venv/bin/python benchmarks/compare_engines.py /tmp/base            # resnet50, vgg11_bn, pvt_v2_b0
    .venv/bin/python benchmarks/compare_engines.py /tmp/base --models resnet18 --size 112

Both versions of ``sp_lightning`` are imported side by side (the other checkout's
and this one's), and their calls alternate on the same model and inputs, so the
printed ratios (this checkout / the other) are robust to machine-wide drift.
One intra-op thread, process CPU time, median of ``--repeats`` after one warm-up call each.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from types import ModuleType

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_engine import MODELS, add_compile_option, build, use_compile_option  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(root: str) -> ModuleType:
    """Import ``sp_lightning`` from the checkout at ``root`` (a fresh copy of the package)."""
    for name in [name for name in sys.modules if name == "sp_lightning" or name.startswith("sp_lightning.")]:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        module = importlib.import_module("sp_lightning")
    finally:
        sys.path.remove(root)
    if not os.path.abspath(module.__file__).startswith(os.path.abspath(root)):
        raise SystemExit(f"imported sp_lightning from {module.__file__}, not from {root}")
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base", help="path of the other checkout (e.g. a git worktree of an older commit)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", type=int, default=224, help="input side")
    add_compile_option(parser)
    args = parser.parse_args()
    use_compile_option(args)
    torch.set_num_threads(1)
    engines = {"base": load(args.base), "this": load(HERE)}
    x = torch.randn(8, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
    targets = {"T=1": 1, "T=4": torch.tensor([[1, 2, 3, 4]] * 8)}
    print(f"torch {torch.__version__}, 1 thread, cpu clock, batch 8 at {args.size}, median of {args.repeats}, "
          f"SP_LIGHTNING_COMPILE={args.compile}")
    for name in args.models:
        model = build(name)
        times: dict[tuple[str, str], list[float]] = {}
        for module in engines.values():  # warm-up: compiled kernels, allocator
            for target in targets.values():
                module.SoftPullback(model).attribute(x, target)
        for _ in range(args.repeats):
            for engine, module in engines.items():
                for kind, target in targets.items():
                    explainer = module.SoftPullback(model)
                    start = time.process_time()
                    explainer.attribute(x, target)
                    times.setdefault((engine, kind), []).append(time.process_time() - start)
        median = {key: statistics.median(values) for key, values in times.items()}
        cells = ", ".join(f"{kind}: base {median[('base', kind)]:.3f} s, this {median[('this', kind)]:.3f} s "
                          f"RATIO {median[('this', kind)] / median[('base', kind)]:.3f}" for kind in targets)
        print(f"{name}: {cells}", flush=True)


if __name__ == "__main__":
    main()
