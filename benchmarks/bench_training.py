"""Training-step time with the soft backward rules vs a standard step, side by side.

    .venv/bin/python benchmarks/bench_training.py              # resnet18 + vit_tiny_patch16_224, batch 32 at 224
    .venv/bin/python benchmarks/bench_training.py --quick      # small smoke run
    .venv/bin/python benchmarks/bench_training.py --profile    # also: where the time goes (top ops)
    .venv/bin/python benchmarks/bench_training.py --memory     # also: peak memory of one step
    .venv/bin/python benchmarks/bench_training.py --breakdown relu maxpool   # also: each rule on its own
    .venv/bin/python benchmarks/bench_training.py --threads 1 --clock cpu   # on a shared, busy machine

A step is zero_grad, forward, cross-entropy, backward, SGD step, on random-init
models in train mode. The soft step runs the forward and the loss inside the
engine's ``SoftBackwardMode``, exactly as ``SoftBackwardTraining`` runs a
Lightning training step; the backward and the optimizer step run outside it.
Both variants train their own copy of the same model and alternate step by
step in one process (median of ``--repeats``), so the printed ratio is robust
to machine-wide drift. On a shared machine, ``--threads 1 --clock cpu`` times
each step by this process's CPU time, which other processes barely disturb.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from bench_engine import add_compile_option, allocator_peak_mib, use_compile_option
from sp_lightning import DEFAULT_TEMPERATURES, SoftRules
from sp_lightning.engine import SoftBackwardMode

MODELS = ("resnet18", "vit_tiny_patch16_224")
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def build(name: str, size: int) -> nn.Module:
    """Random-init model by name (torchvision first, then timm), in train mode."""
    import timm
    import torchvision

    if hasattr(torchvision.models, name):
        return getattr(torchvision.models, name)().train()
    options = {"img_size": size} if "vit" in name else {}
    return timm.create_model(name, pretrained=False, **options).train()


def only(rule: str) -> SoftRules:
    """The default rules with every rule but ``rule`` switched off."""
    return SoftRules.create({name: (tau if name == rule else None) for name, tau in DEFAULT_TEMPERATURES.items()})


def make_step(model: nn.Module, rules: SoftRules | None, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step on ``model``; the forward runs under the soft mode when ``rules`` are given."""
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    mode = SoftBackwardMode(rules) if rules is not None else None

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with mode if mode is not None else nullcontext():
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def compare(
    name: str, variants: dict[str, SoftRules | None], batch: int, size: int, repeats: int, clock: Callable[[], float],
    device: str = "cpu",
) -> dict[str, float]:
    """Median step seconds of every variant (each on its own copy of the model), measured alternately.

    On a GPU, pass a ``clock`` that synchronises the device first, or the steps are only queued.
    """
    torch.manual_seed(0)
    model = build(name, size).to(device)
    x, y = torch.randn(batch, 3, size, size, device=device), torch.randint(0, 1000, (batch,), device=device)
    steps = {key: make_step(copy.deepcopy(model), rules, x, y) for key, rules in variants.items()}
    for step in steps.values():  # warm-up (allocator, lazy init)
        step()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            start = clock()
            step()
            times[key].append(clock() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def peak_memory(name: str, variants: dict[str, SoftRules | None], batch: int, size: int) -> dict[str, float]:
    """Peak MiB held by torch's allocator during one step of each variant (after a warm-up step)."""
    torch.manual_seed(0)
    model = build(name, size)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    peaks = {}
    for key, rules in variants.items():
        step = make_step(copy.deepcopy(model), rules, x, y)
        step()
        peaks[key] = allocator_peak_mib(step)
    return peaks


def profile(name: str, batch: int, size: int, rows: int = 12) -> None:
    """Print the ops that take the most self CPU time in one standard and one soft step."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    model = build(name, size)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 1000, (batch,))
    for key, rules in (("standard", None), ("soft", SoftRules.create())):
        step = make_step(copy.deepcopy(model), rules, x, y)
        step()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        print(f"\n--- {name}, {key} step: top ops by self CPU time")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="'cpu' (process CPU time) is robust on a shared machine with --threads 1")
    parser.add_argument("--quick", action="store_true", help="batch 4 at 64x64, 2 repeats")
    parser.add_argument("--breakdown", nargs="*", default=[], metavar="RULE",
                        help="also time the soft step with only RULE on (one variant per rule)")
    parser.add_argument("--profile", action="store_true", help="also print the top ops of each variant")
    parser.add_argument("--memory", action="store_true", help="also print each variant's peak memory in one step")
    add_compile_option(parser)
    args = parser.parse_args()
    use_compile_option(args)
    if args.quick:
        args.batch, args.size, args.repeats = 4, 64, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
        f"batch {args.batch} at {args.size}x{args.size}, median of {args.repeats}, "
        f"SP_LIGHTNING_COMPILE={args.compile}"
    )
    variants: dict[str, SoftRules | None] = {"standard": None, "soft": SoftRules.create()}
    variants.update({f"only {rule}": only(rule) for rule in args.breakdown})
    print(f"{'model':<24}{'variant':<18}{'s/step':>9}{'ratio to standard':>19}")
    for name in args.models:
        medians = compare(name, variants, args.batch, args.size, args.repeats, CLOCKS[args.clock])
        for key, seconds in medians.items():
            print(f"{name:<24}{key:<18}{seconds:>9.3f}{seconds / medians['standard']:>19.3f}")
    if args.memory:
        print(f"\n{'model':<24}{'variant':<18}{'peak MiB':>9}{'ratio to standard':>19}")
        for name in args.models:
            peaks = peak_memory(name, variants, args.batch, args.size)
            for key, mib in peaks.items():
                print(f"{name:<24}{key:<18}{mib:>9.1f}{mib / peaks['standard']:>19.3f}")
    if args.profile:
        for name in args.models:
            profile(name, args.batch, args.size)


if __name__ == "__main__":
    main()
