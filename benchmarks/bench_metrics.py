"""Each sp_lightning metric vs Quantus 0.6.0: same model, inputs, attributions and settings, one run each.

    python benchmarks/bench_metrics.py            # resnet18 (random init), 16 images at 224x224, CPU

Prints, per metric, the wall time of Quantus and of ours, the speed-up (Quantus / ours),
the share of each side's time spent inside the model's forward (both sides run the same
number of forward passes, so that share bounds the possible speed-up), and how far the
two sides' scores are apart.

The perturbation-heavy metrics run with fewer perturbations than the paper on BOTH sides
so the whole run fits in about 15 minutes on a 2-core CPU: Infidelity 1 round (20
perturbations, paper 5 x 20), MonotonicityCorrelation 1 draw per step (48, paper 480),
MaxSensitivity 3 draws (paper 10). Change them with --infidelity-repeats,
--monotonicity-samples and --sensitivity-samples.
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torchvision

import quantus
from sp_lightning import SoftPullback
from sp_lightning.metrics import (
    FaithfulnessCorrelation,
    FaithfulnessEstimate,
    Focus,
    Infidelity,
    MaxSensitivity,
    MonotonicityCorrelation,
    PointingGame,
    QuantusExplainFunc,
    RandomLogit,
    RelevanceMass,
    make_mosaics,
    optimal_scaling_loss,
)


class ForwardClock:
    """Seconds spent inside ``model.forward`` (forward pre-hook to forward hook)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds, self._start = 0.0, 0.0
        model.register_forward_pre_hook(lambda *_: self._begin())
        model.register_forward_hook(lambda *_: self._end())

    def _begin(self) -> None:
        self._start = time.perf_counter()

    def _end(self) -> None:
        self.seconds += time.perf_counter() - self._start


def block_subsets(side: int, patch: int, images: int) -> Callable[..., np.ndarray]:
    """Stand-in for np.random.choice that hands Quantus's FaithfulnessCorrelation the 16 blocks in order."""
    flat = np.arange(3 * side * side).reshape(3, side, side)
    blocks = [flat[:, r : r + patch, c : c + patch].ravel() for r in range(0, side, patch) for c in range(0, side, patch)]
    calls = iter(range(10**9))
    return lambda n, size, replace=True: blocks[next(calls) // images]


def timed(run: Callable[[], Any], clock: ForwardClock) -> tuple[float, float, np.ndarray]:
    clock.seconds = 0.0
    start = time.perf_counter()
    scores = np.asarray(run(), dtype=np.float64).reshape(-1)
    total = time.perf_counter() - start
    return total, clock.seconds / total, scores


#: One comparison: metric name, its setting, the Quantus run and ours (each returns per-sample scores).
Case = tuple[str, str, Callable[[], Any], Callable[[], Any]]


def metric_cases(n: int, side: int, r: int, d: int, s: int, device: str = "cpu") -> tuple[ForwardClock, list[Case]]:
    """The comparisons on a random-init resnet18 and ``n`` random images ``side`` x ``side`` on ``device``.

    Args:
        n: images.
        side: image height and width.
        r: Infidelity rounds.
        d: MonotonicityCorrelation draws per step.
        s: MaxSensitivity draws.
        device: where the model and both sides' forwards run (Quantus gets the same ``device``).
    """
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval().to(device)
    clock = ForwardClock(model)
    x = (torch.rand(n, 3, side, side) * 2 - 1).to(device)
    y = torch.randint(0, 1000, (n,)).to(device)
    explainer = SoftPullback(model)
    a = explainer.attribute(x, y)
    xn, yn, an = x.cpu().numpy(), y.cpu().numpy(), a.cpu().numpy()
    explain_func = QuantusExplainFunc(explainer)
    step, patch = 3 * side * side // 48, side // 4
    quantus_common: dict[str, Any] = {"model": model, "x_batch": xn, "y_batch": yn, "device": device, "channel_first": True}
    uniform = {"uniform_low": -1.0, "uniform_high": 1.0}
    mosaics = make_mosaics(x, torch.randint(0, 4, (n,)).to(device), generator=0)
    mosaic_a = explainer.attribute(mosaics.images, mosaics.target)
    positions = (mosaics.tile_labels == mosaics.target[:, None]).int().tolist()
    masks = (torch.rand(n, 1, side, side) > 0.7).to(device)
    one_channel = a.sum(dim=1, keepdim=True)

    def ours(metric: Any, *update: Any) -> Callable[[], np.ndarray]:
        def run() -> np.ndarray:
            metric.update(*update)
            return metric.per_sample_scores().cpu().numpy()

        return run

    def faithfulness_correlation_in_quantus() -> list[float]:
        original = np.random.choice
        np.random.choice = block_subsets(side, patch, n)
        try:
            return quantus.FaithfulnessCorrelation(
                nr_runs=16, subset_size=3 * patch * patch, abs=True, perturb_baseline=0.0, return_aggregate=False,
                disable_warnings=True,
            )(a_batch=an, **quantus_common)
        finally:
            np.random.choice = original

    cases: list[Case] = [
        (
            "FaithfulnessEstimate", "48 steps of 3136",
            lambda: quantus.FaithfulnessEstimate(features_in_step=step, abs=True, perturb_baseline=0.0,
                                                 disable_warnings=True)(a_batch=an, **quantus_common),
            ours(FaithfulnessEstimate(model), x, a, y),
        ),
        (
            "FaithfulnessCorrelation", "16 blocks of 56x56",
            faithfulness_correlation_in_quantus,
            ours(FaithfulnessCorrelation(model), x, a, y),
        ),
        (
            "Infidelity", f"{r} x (4 + 16) patches",
            lambda: quantus.Infidelity(perturb_patch_sizes=[side // 2, side // 4], n_perturb_samples=r,
                                       perturb_baseline="uniform", perturb_func_kwargs=uniform,
                                       loss_func=optimal_scaling_loss, disable_warnings=True)(a_batch=an, **quantus_common),
            ours(Infidelity(model, repeats=r), x, a, y),
        ),
        (
            "MonotonicityCorrelation", f"48 steps x {d} draws",
            lambda: quantus.MonotonicityCorrelation(nr_samples=d, features_in_step=step, perturb_baseline="uniform",
                                                    perturb_func_kwargs=uniform, disable_warnings=True)(
                a_batch=an, softmax=True, **quantus_common),
            ours(MonotonicityCorrelation(model, samples=d), x, a, y),
        ),
        (
            "MaxSensitivity", f"{s} draws, SP",
            lambda: quantus.MaxSensitivity(nr_samples=s, lower_bound=0.02, disable_warnings=True)(
                a_batch=an, explain_func=explain_func, **quantus_common),
            ours(MaxSensitivity(model, explainer, samples=s), x, a, y),
        ),
        (
            "RandomLogit", "1 class, SP",
            lambda: quantus.RandomLogit(num_classes=1000, similarity_func=quantus.similarity_func.correlation_pearson,
                                        disable_warnings=True)(a_batch=an, explain_func=explain_func, **quantus_common),
            ours(RandomLogit(model, explainer, num_classes=1000), x, a, y),
        ),
        (
            "Focus", "2x2 mosaics",
            lambda: quantus.Focus(disable_warnings=True)(
                model=model, x_batch=mosaics.images.cpu().numpy(), y_batch=mosaics.target.cpu().numpy(),
                a_batch=(mosaics.images * mosaic_a).cpu().numpy(), custom_batch=positions, device=device,
                channel_first=True),
            ours(Focus(model), mosaics.images, mosaic_a, mosaics.target, mosaics.tile_labels),
        ),
        (
            "PointingGame", "random masks",
            lambda: quantus.PointingGame(disable_warnings=True)(a_batch=one_channel.cpu().numpy(), s_batch=masks.cpu().numpy().astype(np.float32), **quantus_common),
            ours(PointingGame(model), x, one_channel, y, masks),
        ),
        (
            "RelevanceMass", "random masks",
            lambda: quantus.RelevanceMassAccuracy(disable_warnings=True)(a_batch=one_channel.cpu().numpy(), s_batch=masks.cpu().numpy().astype(np.float32), **quantus_common),
            ours(RelevanceMass(model), x, one_channel, y, masks),
        ),
    ]
    return clock, cases


def compare_case(case: Case, clock: ForwardClock) -> dict[str, Any]:
    """Run one comparison, Quantus first: seconds, forward-time shares and scores of both sides."""
    name, setting, theirs, mine = case
    q_time, q_share, q_scores = timed(theirs, clock)
    o_time, o_share, o_scores = timed(mine, clock)
    diff = float(np.nanmax(np.abs(q_scores - o_scores))) if q_scores.shape == o_scores.shape else float("nan")
    return {"name": name, "setting": setting, "quantus_s": q_time, "ours_s": o_time, "speedup": q_time / o_time,
            "shares": (q_share, o_share), "max_diff": diff, "means": (np.nanmean(q_scores), np.nanmean(o_scores))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--side", type=int, default=224)
    parser.add_argument("--infidelity-repeats", type=int, default=1)
    parser.add_argument("--monotonicity-samples", type=int, default=1)
    parser.add_argument("--sensitivity-samples", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    n, side = args.images, args.side
    clock, cases = metric_cases(n, side, args.infidelity_repeats, args.monotonicity_samples, args.sensitivity_samples)
    print(f"resnet18 (random init), {n} images {side}x{side}, CPU, torch {torch.__version__}, quantus {quantus.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    header = f"{'metric':<24} {'setting':<22} {'quantus s':>10} {'ours s':>9} {'speed-up':>9} {'fwd share q/ours':>17} {'max |diff|':>11} {'mean q / ours':>17}"
    print(header)
    print("-" * len(header))
    for case in cases:
        c = compare_case(case, clock)
        (q_share, o_share), (q_mean, o_mean) = c["shares"], c["means"]
        print(f"{c['name']:<24} {c['setting']:<22} {c['quantus_s']:>10.2f} {c['ours_s']:>9.2f} {c['speedup']:>8.1f}x "
              f"{q_share:>8.0%} / {o_share:<6.0%} {c['max_diff']:>11.2e} {q_mean:>8.3f} / {o_mean:<7.3f}",
              flush=True)


if __name__ == "__main__":
    main()
