"""Engine benchmark: SoftPullback vs plain input gradient, and T targets in one call vs T calls.

    .venv/bin/python benchmarks/bench_engine.py            # full run (resnet50, vgg11_bn, pvt_v2_b0; batch 8 at 224)
    .venv/bin/python benchmarks/bench_engine.py --quick    # small smoke run
    .venv/bin/python benchmarks/bench_engine.py --threads 1 --clock cpu --repeats 3   # the recorded setting

Time: both methods run interleaved in one process (median of --repeats), so the
printed ratio is robust to machine-wide drift. ``fwd s`` is the forward half of
one SP call; with b = backward / forward it gives ``bound`` = (1 + 4b) / (4 + 4b),
the T=4 ratio of a call that shares the forward and nothing else. Peak memory: each (model, method)
runs in a fresh subprocess. The headline number is the peak of bytes held by
torch's allocator during one explanation (from the profiler's memory events:
deterministic). Peak RSS minus the RSS before the call is printed beside it; it
includes malloc caching and varies by several percent from run to run.

A second table follows, at torch's default thread count and wall clock
whatever ``--threads`` and ``--clock`` say (how users run): the gradient, SP
with the eager kernels (``SP_LIGHTNING_COMPILE=never``) and SP with the compiled
ones (``always``), all three interleaved in one process (the policy is read at
each backward, so it switches between calls). ``x`` is the ratio of the medians, ``pair x`` the
median of each round's own ratio (a round runs the three back to back, so a slow patch of the
machine slows both sides of its ratio: the steadier figure on a noisy machine). ``first x``: each policy's first
SP call in a fresh process (after one gradient call, so the process's own lazy
set-up is not counted) against that process's second gradient call; for the
compiled kernels it includes compiling them, or loading them from inductor's
on-disk cache when an earlier run left them there. ``--policy-repeats 0`` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import torch

MODELS = ("resnet50", "vgg11_bn", "pvt_v2_b0")


def build(name: str) -> torch.nn.Module:
    """Random-init model by name (torchvision first, then timm)."""
    import timm
    import torchvision

    if hasattr(torchvision.models, name):
        return getattr(torchvision.models, name)().eval()
    return timm.create_model(name, pretrained=False).eval()


def explainer(method: str, model: torch.nn.Module) -> Callable[[torch.Tensor, object], torch.Tensor]:
    import sp_lightning as sp

    return (sp.Gradient(model) if method == "gradient" else sp.SoftPullback(model)).attribute


def soft_forward(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward half of one SoftPullback call: the model under the soft rules, recording its graph."""
    import sp_lightning as sp

    def run(x: torch.Tensor) -> torch.Tensor:
        with sp.soft_backward(model):
            return model(x.detach().requires_grad_(True))

    return run


def rss_kib() -> int:
    """Current resident set size of this process in KiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def allocator_peak_mib(run: Callable[[], object]) -> float:
    """Peak bytes held by torch's allocator while ``run`` executes, above the level at its start."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return (max(totals) - totals[0]) / 2**20 if totals else 0.0


def child_peak(name: str, method: str, batch: int, size: int) -> None:
    """(subprocess) print the allocator peak and the RSS increase of one explanation, in MiB."""
    torch.manual_seed(0)
    model = build(name)
    x = torch.randn(batch, 3, size, size)
    run = explainer(method, model)
    before = rss_kib()
    run(x, 1)
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(json.dumps({"alloc_mib": allocator_peak_mib(lambda: run(x, 1)), "rss_mib": rss}))


def child_first_call(name: str, batch: int, size: int) -> None:
    """(subprocess) print the first SP call's and the second gradient call's wall time, in seconds."""
    torch.manual_seed(0)
    model = build(name)
    x = torch.randn(batch, 3, size, size)
    grad, soft = explainer("gradient", model), explainer("soft", model)
    grad(x, 1)  # the process's own lazy set-up (allocator, convolution primitives)
    first = timed(lambda: soft(x, 1), time.perf_counter)
    print(json.dumps({"sp_first_s": first, "grad_s": timed(lambda: grad(x, 1), time.perf_counter)}))


def in_child(mode: str, args: list[str], policy: str | None = None) -> dict[str, float]:
    """Run this script's ``mode`` child on ``args`` (at this process's thread count, under ``policy``,
    else this process's one) and return the JSON it prints."""
    policy = policy or os.environ.get("SP_LIGHTNING_COMPILE", "auto")
    cmd = [sys.executable, __file__, "--threads", str(torch.get_num_threads()), "--compile", policy, mode, *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def peak_mib(name: str, method: str, batch: int, size: int, policy: str | None = None) -> dict[str, float]:
    return in_child("--child", [name, method, str(batch), str(size)], policy)


def add_compile_option(parser: argparse.ArgumentParser) -> None:
    """``--compile``: the soft rules' kernel policy for the run (shared by the engine benchmarks)."""
    parser.add_argument("--compile", choices=["always", "auto", "never"], default="always",
                        help="SP_LIGHTNING_COMPILE for the soft rules' kernels (always: the steady state that "
                             "auto reaches once eager work would have paid for compiling)")


def use_compile_option(args: argparse.Namespace) -> None:
    """Apply ``--compile``: the engine reads it at each backward, and child processes inherit it."""
    os.environ["SP_LIGHTNING_COMPILE"] = args.compile


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed(fn: Callable[[], object], clock: Callable[[], float]) -> float:
    start = clock()
    fn()
    return clock() - start


#: torch's own thread count for this process, read before ``--threads`` changes it.
DEFAULT_THREADS = torch.get_num_threads()


def main_table(models: tuple[str, ...], batch: int, size: int, repeats: int, clock_name: str, policy: str) -> None:
    """SP vs gradient time and memory, T=4 vs 4 calls, at this process's thread count and ``clock_name``."""
    clock = CLOCKS[clock_name]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock_name} clock, "
          f"batch {batch} at {size}x{size}, median of {repeats}, SP_LIGHTNING_COMPILE={policy}")
    print(f"{'model':<10} {'grad s':>8} {'SP s':>8} {'time x':>7} {'grad MiB':>9} {'SP MiB':>8} {'mem x':>6} "
          f"{'RSS x':>6} {'4 calls s':>9} {'1 call s':>8} {'T=4 x':>6} {'fwd s':>6} {'bound':>6}")
    for name in models:
        torch.manual_seed(0)
        model = build(name)
        x = torch.randn(batch, 3, size, size)
        grad, soft = explainer("gradient", model), explainer("soft", model)
        targets = torch.randint(0, 1000, (batch, 4), generator=torch.Generator().manual_seed(0))
        forward = soft_forward(model)
        grad(x, 1), soft(x, 1)  # warm-up
        t_grad, t_soft, t_four, t_one, t_fwd = [], [], [], [], []
        for _ in range(repeats):
            t_grad.append(timed(lambda: grad(x, 1), clock))
            t_soft.append(timed(lambda: soft(x, 1), clock))
            t_four.append(timed(lambda: [soft(x, targets[:, i]) for i in range(4)], clock))
            t_one.append(timed(lambda: soft(x, targets), clock))
            t_fwd.append(timed(lambda: forward(x), clock))
        g, s, four, one, f = (statistics.median(t) for t in (t_grad, t_soft, t_four, t_one, t_fwd))
        b = (s - f) / f  # backward / forward time of one SP call
        bound = (1 + 4 * b) / (4 + 4 * b)  # T=4 ratio if one call shared only the forward
        m_grad, m_soft = peak_mib(name, "gradient", batch, size), peak_mib(name, "soft", batch, size)
        a_grad, a_soft = m_grad["alloc_mib"], m_soft["alloc_mib"]
        print(f"{name:<10} {g:8.3f} {s:8.3f} {s / g:7.3f} {a_grad:9.1f} {a_soft:8.1f} {a_soft / a_grad:6.3f} "
              f"{m_soft['rss_mib'] / m_grad['rss_mib']:6.3f} {four:9.3f} {one:8.3f} {one / four:6.3f} {f:6.3f} {bound:6.3f}",
              flush=True)


#: The kernel policies the second table compares: eager kernels, and compiled ones from the first call.
POLICIES = ("never", "always")


def policy_table(models: tuple[str, ...], batch: int, size: int, repeats: int) -> None:
    """Gradient, eager SP and compiled SP interleaved at torch's default thread count, wall clock."""
    torch.set_num_threads(DEFAULT_THREADS)
    print(f"\ntorch's default {DEFAULT_THREADS} threads, wall clock, batch {batch} at {size}x{size}, median of "
          f"{repeats} interleaved (gradient, SP never, SP always); first x: first SP call in a fresh process")
    print(f"{'model':<10} {'grad s':>7} " + " ".join(
        f"{p + ' s':>8} {p + ' x':>8} {'pair x':>6} {'min x':>6} {'first x':>7} {'mem x':>6}" for p in POLICIES))
    previous = os.environ.get("SP_LIGHTNING_COMPILE")
    try:
        for name in models:
            torch.manual_seed(0)
            model = build(name)
            x = torch.randn(batch, 3, size, size)
            grad, soft = explainer("gradient", model), explainer("soft", model)
            runs: dict[str, Callable[[], object]] = {"gradient": lambda: grad(x, 1)}
            for policy in POLICIES:
                runs[policy] = lambda policy=policy: (os.environ.__setitem__("SP_LIGHTNING_COMPILE", policy), soft(x, 1))
            for run in runs.values():
                run()  # warm-up (compiles the kernels for "always")
            times: dict[str, list[float]] = {key: [] for key in runs}
            for _ in range(repeats):
                for key, run in runs.items():
                    times[key].append(timed(run, time.perf_counter))
            g = statistics.median(times["gradient"])
            a_grad = peak_mib(name, "gradient", batch, size)["alloc_mib"]
            cells = []
            for policy in POLICIES:
                s = statistics.median(times[policy])
                paired = statistics.median(a / b for a, b in zip(times[policy], times["gradient"]))
                fastest = min(times[policy]) / min(times["gradient"])
                first = in_child("--first-call", [name, str(batch), str(size)], policy)
                memory = peak_mib(name, "soft", batch, size, policy)["alloc_mib"] / a_grad
                cells.append(f"{s:8.3f} {s / g:8.3f} {paired:6.3f} {fastest:6.3f} {first['sp_first_s'] / first['grad_s']:7.2f} "
                             f"{memory:6.3f}")
            print(f"{name:<10} {g:7.3f} " + " ".join(cells), flush=True)
    finally:
        if previous is None:
            os.environ.pop("SP_LIGHTNING_COMPILE", None)
        else:
            os.environ["SP_LIGHTNING_COMPILE"] = previous


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small inputs, one model, few repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="'cpu' (process CPU time) is robust on a shared machine when --threads 1")
    parser.add_argument("--models", nargs="+", help="override the model list")
    parser.add_argument("--policy-repeats", type=int, default=None,
                        help="repeats of the default-thread eager/compiled table (default: --repeats; 0 skips it)")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--first-call", nargs=3, help=argparse.SUPPRESS)
    add_compile_option(parser)
    args = parser.parse_args()
    use_compile_option(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        name, method, batch, size = args.child
        child_peak(name, method, int(batch), int(size))
        return
    if args.first_call:
        name, batch, size = args.first_call
        child_first_call(name, int(batch), int(size))
        return
    models, batch, size, repeats = (("resnet18",), 2, 64, 3) if args.quick else (MODELS, 8, 224, args.repeats)
    models = tuple(args.models or models)
    main_table(models, batch, size, repeats, args.clock, args.compile)
    policy_repeats = repeats if args.policy_repeats is None else args.policy_repeats
    if policy_repeats > 0:
        policy_table(models, batch, size, policy_repeats)


if __name__ == "__main__":
    main()
