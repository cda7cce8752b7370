"""Engine benchmark: SoftPullback vs plain input gradient, and T targets in one call vs T calls.

    .venv/bin/python benchmarks/bench_engine.py            # full run (resnet50, vgg11_bn, pvt_v2_b0; batch 8 at 224)
    .venv/bin/python benchmarks/bench_engine.py --quick    # small smoke run

Time: both methods run interleaved in one process (median of --repeats), so the
printed ratio is robust to machine-wide drift. ``fwd s`` is the forward half of
one SP call; with b = backward / forward it gives ``bound`` = (1 + 4b) / (4 + 4b),
the T=4 ratio of a call that shares the forward and nothing else. Peak memory: each (model, method)
runs in a fresh subprocess. The headline number is the peak of bytes held by
torch's allocator during one explanation (from the profiler's memory events:
deterministic). Peak RSS minus the RSS before the call is printed beside it; it
includes malloc caching and varies by several percent from run to run.
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


def peak_mib(name: str, method: str, batch: int, size: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", name, method, str(batch), str(size)]
    if torch.get_num_threads() == 1:
        cmd[2:2] = ["--threads", "1"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small inputs, one model, few repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="'cpu' (process CPU time) is robust on a shared machine when --threads 1")
    parser.add_argument("--models", nargs="+", help="override the model list")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    add_compile_option(parser)
    args = parser.parse_args()
    use_compile_option(args)
    if args.child:
        if args.threads:
            torch.set_num_threads(args.threads)
        name, method, batch, size = args.child
        child_peak(name, method, int(batch), int(size))
        return
    models, batch, size, repeats = (("resnet18",), 2, 64, 3) if args.quick else (MODELS, 8, 224, args.repeats)
    models = args.models or models
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = CLOCKS[args.clock]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, "
          f"batch {batch} at {size}x{size}, median of {repeats}, SP_LIGHTNING_COMPILE={args.compile}")
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


if __name__ == "__main__":
    main()
