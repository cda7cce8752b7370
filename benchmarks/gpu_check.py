"""The GPU check: CUDA correctness checks and every benchmark figure, in one run of at most 8 minutes.

    make gpu-check                              # = .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py --dry-run   # tiny sizes on CPU even where CUDA exists

Checks (one PASS/FAIL line each; exit status 1 when one fails):
  zoo           engine results on CUDA equal the CPU results for the test zoo (SP for 3 targets, gradient)
  batched       one batched backward across T targets equals T separate calls, on the device
  cudnn_bn      BatchNorm through cuDNN: eval explanations and a train-mode soft step match the CPU
  triton        the soft rules' compiled kernels (SP_LIGHTNING_COMPILE=always) match the eager code
  bf16_mixed    a Lightning fit with precision="bf16-mixed", soft training and the callback
  lightning     the callback and soft training on accelerator="gpu"
Benchmarks (figures with their targets; a missed target does not fail the run):
  engine        SP vs gradient: time and peak memory; T=4 targets in one call vs 4 calls (target <= 0.4)
  training      soft training step vs standard step (target <= 1.10)
  callback      wall time of a fit with / without the callback (target <= 1.02)
  metrics       our metrics vs Quantus 0.6.0 (target >= 20x on a GPU)

Without CUDA (or with --dry-run) the same code runs at tiny sizes on CPU, says so and
exits 0 when the plumbing works; its figures mean nothing. CI runs this dry run
(tests/test_gpu_check.py). Each part has a time budget (``BUDGETS``); a part stops at
the end of its budget and says what it left out.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]  # the benchmarks and the test zoo

import bench_callback  # noqa: E402
import bench_engine  # noqa: E402
import bench_training  # noqa: E402
from test_zoo import ZOO, with_nonzero_heads  # noqa: E402

import sp_lightning as sp  # noqa: E402
from sp_lightning.engine import SoftBackwardMode  # noqa: E402
from sp_lightning.engine.rules import kernels  # noqa: E402
from sp_lightning.sinks import ImageSink  # noqa: E402

DRY_RUN_LINE = "no CUDA: dry run of the plumbing at tiny sizes on CPU"
#: Seconds per part on one GPU (the whole run: at most 8 minutes, with start-up and compiling).
BUDGETS = {"zoo": 60, "engine": 80, "training": 50, "callback": 70, "metrics": 120}


@dataclass(frozen=True)
class Sizes:
    """How big each part runs: the GPU run, or the tiny dry run."""

    zoo: tuple[str, ...]
    engine_models: tuple[str, ...]
    engine_batch: int
    engine_size: int
    repeats: int
    training_models: tuple[str, ...]
    training_batch: int
    training_size: int
    callback_batches: int
    callback_epochs: int
    metric_images: int
    metric_side: int
    metrics: tuple[str, ...] | None = None  # the metrics to compare (None: all of bench_metrics')


GPU = Sizes(tuple(sorted(ZOO)), bench_engine.MODELS, 8, 224, 7, bench_training.MODELS, 32, 224, 800, 2, 8, 224)
TINY = Sizes(("timm_vit_tiny",), ("resnet18",), 2, 32, 1, ("resnet18",), 2, 32, 3, 1, 2, 32, ("RandomLogit", "Focus"))


class Report:
    """Collects PASS/FAIL lines and figures; prints each as it comes."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.figures: list[str] = []

    def check(self, name: str, ok: bool, detail: str) -> None:
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        if not ok:
            self.failed.append(name)

    def crashed(self, name: str, error: BaseException) -> None:
        self.check(name, False, f"raised {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")

    def figure(self, text: str) -> None:
        print(f"  {text}", flush=True)
        self.figures.append(text)


class Budget:
    """A part's deadline."""

    def __init__(self, seconds: float) -> None:
        self.end = time.perf_counter() + seconds

    @property
    def left(self) -> bool:
        return time.perf_counter() < self.end


def clock_for(device: torch.device) -> Callable[[], float]:
    """Wall clock that waits for the device's queued work first."""
    if device.type == "cuda":
        return lambda: (torch.cuda.synchronize(), time.perf_counter())[1]
    return time.perf_counter


@contextmanager
def compile_policy(policy: str) -> Iterator[None]:
    """``SP_LIGHTNING_COMPILE=policy`` inside the block (the engine reads it at each backward)."""
    before = os.environ.get("SP_LIGHTNING_COMPILE")
    os.environ["SP_LIGHTNING_COMPILE"] = policy
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("SP_LIGHTNING_COMPILE")
        else:
            os.environ["SP_LIGHTNING_COMPILE"] = before


@contextmanager
def exact_float32() -> Iterator[None]:
    """No TF32 in matmuls and convolutions, so CUDA and CPU results are comparable."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def relative_error(got: Tensor, want: Tensor) -> float:
    """max |got - want| / max |want| (both moved to the CPU)."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


TOLERANCE = 2e-3  # relative to the largest value: float32 without TF32, different kernels and summation orders


# --------------------------------------------------------------------------- correctness checks


def check_zoo(report: Report, device: torch.device, names: tuple[str, ...], budget: Budget) -> None:
    """SP toward 3 targets and the gradient of every zoo model: device vs CPU."""
    worst, done = 0.0, []
    for name in names:
        if not budget.left:
            break
        build, size, _ = ZOO[name]
        torch.manual_seed(0)
        model = with_nonzero_heads(build()).eval()
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        targets = torch.tensor([[3, 1, 7], [0, 9, 2]])
        want = sp.SoftPullback(model).attribute(x, targets), sp.Gradient(model).attribute(x, targets[:, 0])
        model.to(device)
        got = (sp.SoftPullback(model).attribute(x.to(device), targets.to(device)),
               sp.Gradient(model).attribute(x.to(device), targets[:, 0].to(device)))
        errors = [relative_error(g, w) for g, w in zip(got, want)]
        worst = max(worst, *errors)
        done.append(f"{name} {max(errors):.1e}")
    left = len(names) - len(done)
    report.check("zoo", worst <= TOLERANCE and bool(done),
                 f"{len(done)} models on {device.type} vs cpu, worst relative error {worst:.1e} (tolerance {TOLERANCE})"
                 + (f", {left} left out (budget)" if left else "") + "; " + ", ".join(done))


def check_batched(report: Report, device: torch.device) -> None:
    """One backward batched across 4 targets vs 4 calls, on the device, with the soft rules and without."""
    build, size, _ = ZOO["tv_resnet18"]
    torch.manual_seed(0)
    model = build().eval().to(device)
    x = torch.randn(4, 3, size, size, device=device)
    targets = torch.randint(0, 10, (4, 4), device=device)
    errors = []
    for explainer in (sp.SoftPullback(model), sp.Gradient(model)):
        explainer.batch_targets = True  # the CPU's default is one backward per target
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback to the per-target loop is a failure
            batched = explainer.attribute(x, targets)
        separate = torch.stack([explainer.attribute(x, targets[:, t]) for t in range(4)], dim=1)
        errors.append(relative_error(batched, separate))
    report.check("batched", max(errors) <= 1e-4,
                 f"T=4 in one batched backward vs 4 calls on {device.type}: SP {errors[0]:.1e}, gradient {errors[1]:.1e}")


def bn_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(32, 10),
    )


def check_cudnn_bn(report: Report, device: torch.device) -> None:
    """Eval BatchNorm (the engine's direct path) and train BatchNorm (cuDNN's kernels) vs the CPU."""
    torch.manual_seed(0)
    model = bn_net()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    eval_cpu = sp.SoftPullback(model.eval()).attribute(x, y)
    grads = []
    for where in (torch.device("cpu"), device):
        net = copy.deepcopy(model).train().to(where)
        with sp.soft_backward(net):
            loss = nn.functional.cross_entropy(net(x.to(where)), y.to(where))
        loss.backward()
        grads.append(torch.cat([p.grad.flatten().cpu() for p in net.parameters()]))
    model.eval().to(device)
    eval_error = relative_error(sp.SoftPullback(model).attribute(x.to(device), y.to(device)), eval_cpu)
    train_error = relative_error(grads[1], grads[0])
    cudnn = device.type == "cuda" and torch.backends.cudnn.enabled
    report.check("cudnn_bn", max(eval_error, train_error) <= TOLERANCE,
                 f"{'cuDNN' if cudnn else 'native'} BatchNorm on {device.type}: eval SP {eval_error:.1e}, "
                 f"train-mode soft step parameter gradients {train_error:.1e} vs cpu")


def check_triton(report: Report, device: torch.device) -> None:
    """The compiled soft-rule kernels (Triton) vs the eager code, 1 and 3 targets (the second in a batched backward)."""
    if device.type != "cuda":
        print("SKIP triton: not in the dry run (compiling for the CPU takes ~30 s on 2 cores; "
              "tests/test_kernels.py checks the compiled kernels on CPU)", flush=True)
        return
    torch.manual_seed(0)
    model = bn_net().eval().to(device)
    x = torch.randn(4, 3, 96, 96, device=device)  # activations above kernels.MIN_FUSED_NUMEL
    targets = torch.randint(0, 10, (4, 3), device=device)
    runs = {}
    for policy in ("never", "always"):
        with compile_policy(policy), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            explainer = sp.SoftPullback(model)
            runs[policy] = explainer.attribute(x, targets[:, 0]), explainer.attribute(x, targets)
        failures = [str(w.message).splitlines()[0] for w in caught if "torch.compile" in str(w.message)]
    compiled = [k.fn.__name__ for k in (kernels._PHI, kernels._PHI_COTANGENTS, kernels._GATE_COTANGENTS)
                if k.compiled is not None and not k.broken]
    errors = [relative_error(a, b) for a, b in zip(runs["always"], runs["never"])]
    report.check("triton", max(errors) <= 1e-4 and not failures and len(compiled) == 3,
                 f"compiled kernels {compiled} vs eager on {device.type}: 1 target {errors[0]:.1e}, "
                 f"3 targets {errors[1]:.1e}" + (f"; compile failed: {failures[0]}" if failures else ""))


class Remember(ImageSink):
    """Counts the pictures the callback sends."""

    def __init__(self) -> None:
        self.steps: list[int] = []

    def log_images(self, images: Any, step: int, caption: str) -> None:
        self.steps.append(step)


class Scalars(bench_callback.Seconds):
    """Keeps every scalar the fit logs."""

    def __init__(self) -> None:
        super().__init__()
        self.all: dict[str, float] = {}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.all.update(metrics)


class Probed(bench_callback.SmallCNN):
    """Counts the training steps that run under the engine's soft mode (what ``SoftBackwardTraining`` installs)."""

    soft_steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        stack = torch.overrides._get_current_function_mode_stack()
        self.soft_steps += any(isinstance(mode, SoftBackwardMode) for mode in stack)
        return super().training_step(batch, batch_idx)


def check_fit(report: Report, name: str, device: torch.device, precision: str) -> None:
    """A short fit with soft training and the callback: it must log pictures and finite scalars."""
    import lightning.pytorch as pl

    pl.seed_everything(0, verbose=False)
    sink, scalars = Remember(), Scalars()
    with tempfile.TemporaryDirectory() as root:
        trainer = pl.Trainer(
            accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
            max_epochs=2, limit_train_batches=3, limit_val_batches=1, num_sanity_val_steps=0,
            callbacks=[sp.SoftBackwardTraining(), sp.SemanticPullbackCallback(sinks=[sink], on_error="raise",
                                                                              background=False, timelapse=False)],
            logger=scalars, default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False,
        )
        model = Probed()
        trainer.fit(model, datamodule=bench_callback.Data(3))
    finite = all(math.isfinite(v) for v in scalars.all.values())
    on = trainer.strategy.root_device.type
    report.check(name, len(sink.steps) == 3 and finite and model.soft_steps == 6,
                 f"fit on {on} at precision {precision}: {len(sink.steps)} callback logs (want 3), "
                 f"{model.soft_steps} of 6 training steps under the soft rules, "
                 f"{len(scalars.all)} scalars {'all finite' if finite else 'NOT all finite'}")


# --------------------------------------------------------------------------- benchmarks


def peak_mib(run: Callable[[], object], device: torch.device) -> float:
    """Peak MiB allocated while ``run`` executes, above the level at its start."""
    if device.type != "cuda":
        return bench_engine.allocator_peak_mib(run)
    torch.cuda.synchronize()
    start = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - start) / 2**20


def median_times(runs: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Median seconds of each run, interleaved, after one warm-up each."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {key: [] for key in runs}
    for _ in range(repeats):
        for key, run in runs.items():
            times[key].append(bench_engine.timed(run, clock))
    return {key: statistics.median(values) for key, values in times.items()}


def bench_engine_part(report: Report, device: torch.device, sizes: Sizes, budget: Budget) -> None:
    clock = clock_for(device)
    for name in sizes.engine_models:
        if not budget.left:
            report.figure(f"engine {name}: left out (budget)")
            continue
        torch.manual_seed(0)
        model = bench_engine.build(name).to(device)
        x = torch.randn(sizes.engine_batch, 3, sizes.engine_size, sizes.engine_size, device=device)
        targets = torch.randint(0, 1000, (sizes.engine_batch, 4), device=device)
        grad, soft = bench_engine.explainer("gradient", model), bench_engine.explainer("soft", model)
        looped, batched = sp.SoftPullback(model), sp.SoftPullback(model)
        looped.batch_targets, batched.batch_targets = False, True
        t = median_times({
            "grad": lambda: grad(x, 1), "sp": lambda: soft(x, 1),
            "four": lambda: [soft(x, targets[:, i]) for i in range(4)],
            "batched": lambda: batched.attribute(x, targets), "loop": lambda: looped.attribute(x, targets),
        }, sizes.repeats, clock)
        m_grad, m_soft = peak_mib(lambda: grad(x, 1), device), peak_mib(lambda: soft(x, 1), device)
        report.figure(f"engine {name} (batch {sizes.engine_batch} at {sizes.engine_size}): SP/gradient time "
                      f"{t['sp'] / t['grad']:.3f} ({t['sp']:.4f} / {t['grad']:.4f} s), memory {m_soft / m_grad:.3f} "
                      f"({m_soft:.0f} / {m_grad:.0f} MiB); T=4 one batched call / 4 calls {t['batched'] / t['four']:.3f} "
                      f"(target <= 0.4), shared forward + 4 backwards / 4 calls {t['loop'] / t['four']:.3f}")


def bench_training_part(report: Report, device: torch.device, sizes: Sizes, budget: Budget) -> None:
    variants = {"standard": None, "soft": sp.SoftRules.create()}
    for name in sizes.training_models:
        if not budget.left:
            report.figure(f"training {name}: left out (budget)")
            continue
        steps = bench_training.compare(name, variants, sizes.training_batch, sizes.training_size,
                                       max(2, 2 * sizes.repeats), clock_for(device), device=str(device))
        report.figure(f"training {name} (batch {sizes.training_batch} at {sizes.training_size}): soft/standard step "
                      f"{steps['soft'] / steps['standard']:.3f} ({steps['soft']:.4f} / {steps['standard']:.4f} s; "
                      "target <= 1.10)")


def bench_callback_part(report: Report, device: torch.device, sizes: Sizes, budget: Budget) -> None:
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    walls: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as root:
        for repeat in range(2):
            if repeat and not budget.left:
                break
            for with_callback in (False, True):
                run = bench_callback.run(with_callback, sizes.callback_batches, sizes.callback_epochs,
                                         os.path.join(root, f"{repeat}{with_callback}"), accelerator)
                walls[with_callback].append(run.wall)
    report.figure(f"callback ({sizes.callback_batches} batches x {sizes.callback_epochs} epochs on {accelerator}, "
                  f"{len(walls[True])} runs each way): wall with/without, fastest runs "
                  f"{min(walls[True]) / min(walls[False]):.3f} ({min(walls[True]):.1f} / {min(walls[False]):.1f} s; "
                  "target <= 1.02)")


def bench_metrics_part(report: Report, device: torch.device, sizes: Sizes, budget: Budget) -> None:
    import bench_metrics

    warnings.filterwarnings("ignore", module="quantus")
    clock, cases = bench_metrics.metric_cases(sizes.metric_images, sizes.metric_side, 1, 1, 3, device=str(device))
    speedups = []
    for case in cases:
        if sizes.metrics is not None and case[0] not in sizes.metrics:
            continue
        if not budget.left:
            report.figure(f"metrics {case[0]}: left out (budget)")
            continue
        c = bench_metrics.compare_case(case, clock)
        speedups.append(c["speedup"])
        report.figure(f"metrics {c['name']} ({c['setting']}): Quantus {c['quantus_s']:.2f} s, ours {c['ours_s']:.3f} s, "
                      f"{c['speedup']:.1f}x (target >= 20x), max |score diff| {c['max_diff']:.1e}")
    if speedups:
        report.figure(f"metrics: geometric-mean speed-up {math.exp(statistics.mean(map(math.log, speedups))):.1f}x, "
                      f"lowest {min(speedups):.1f}x over {len(speedups)} metrics "
                      f"({sizes.metric_images} images at {sizes.metric_side} on {device.type})")


# --------------------------------------------------------------------------- driver


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU even where CUDA is available")
    args = parser.parse_args()
    dry = args.dry_run or not torch.cuda.is_available()
    device = torch.device("cpu" if dry else "cuda")
    sizes = TINY if dry else GPU
    scale = 0.25 if dry else 1.0  # the dry run's budgets: its sizes are tiny, only a stuck part runs long
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")
    start = time.perf_counter()
    if dry:
        print(DRY_RUN_LINE + ("" if torch.cuda.is_available() else " (torch.cuda.is_available() is False)"), flush=True)
    else:
        print(f"CUDA {torch.version.cuda}: {torch.cuda.get_device_name(0)}, cuDNN {torch.backends.cudnn.version()}",
              flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads", flush=True)
    report = Report()
    checks: list[tuple[str, Callable[[], None]]] = [
        ("batched", lambda: check_batched(report, device)),
        ("cudnn_bn", lambda: check_cudnn_bn(report, device)),
        ("triton", lambda: check_triton(report, device)),
        ("bf16_mixed", lambda: check_fit(report, "bf16_mixed", device, "bf16-mixed")),
        ("lightning", lambda: check_fit(report, "lightning", device, "32-true")),
        ("zoo", lambda: check_zoo(report, device, sizes.zoo, Budget(BUDGETS["zoo"] * scale))),
    ]
    with exact_float32():
        for name, run in checks:
            began = time.perf_counter()
            try:
                run()
            except Exception as error:  # one broken check must not hide the others' results
                report.crashed(name, error)
            print(f"  ({name} took {time.perf_counter() - began:.0f} s)", flush=True)
    print(f"checks took {time.perf_counter() - start:.0f} s", flush=True)
    parts = [("engine", bench_engine_part), ("training", bench_training_part), ("callback", bench_callback_part),
             ("metrics", bench_metrics_part)]
    with compile_policy(os.environ.get("SP_LIGHTNING_COMPILE", "always" if not dry else "never")):
        for name, part in parts:
            began = time.perf_counter()
            try:
                part(report, device, sizes, Budget(BUDGETS[name] * scale))
            except Exception as error:
                report.crashed(f"benchmark {name}", error)
            print(f"{name} took {time.perf_counter() - began:.0f} s", flush=True)
    print(f"\nSUMMARY ({'dry run on CPU, tiny sizes: the figures mean nothing' if dry else device}), "
          f"{time.perf_counter() - start:.0f} s")
    for text in report.figures:
        print(f"  {text}")
    if report.failed:
        print(f"FAILED checks: {', '.join(report.failed)}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
