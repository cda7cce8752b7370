"""sp_lightning.metrics agree with Quantus 0.6.0 on the same model, inputs and attributions.

Deterministic metrics are compared directly. For the stochastic ones Quantus is fed
exactly the draws our metric made: replayed through a custom ``perturb_func``, or
through a patched ``np.random`` call where Quantus offers no hook (random subsets of
FaithfulnessCorrelation, the off-class of RandomLogit). Everything is then
deterministic, so all comparisons use a relative tolerance of 1e-5.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

quantus = pytest.importorskip("quantus", minversion="0.6.0")

from _metrics_support import BATCH, SIDE, batch, record_draws, tiny_cnn  # noqa: E402

from sp_lightning import SoftPullback  # noqa: E402
from sp_lightning.metrics import (  # noqa: E402
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
    optimal_scaling_loss,
)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
RTOL = 1e-5
STEP = 3 * SIDE * SIDE // 48  # the paper's 48 steps (3136 elements at 224x224)


def run_quantus(metric: Any, model: torch.nn.Module, x, y, a, **kwargs: Any) -> np.ndarray:
    scores = metric(
        model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=a.numpy(), device="cpu", channel_first=True, **kwargs
    )
    return np.asarray(scores, dtype=np.float64)


def replay_constants(values: Iterator[np.ndarray]):
    """A Quantus perturb_func that sets the indexed elements of each sample to the next recorded value."""

    def perturb(arr: np.ndarray, indices: np.ndarray, **_: Any) -> np.ndarray:
        out = arr.copy()
        out[np.arange(arr.shape[0])[:, None], indices] = next(values)[:, None]
        return out

    return perturb


def ours(metric: Any, *args: Any) -> np.ndarray:
    metric.update(*args)
    return metric.per_sample_scores().double().numpy()


def test_faithfulness_estimate_matches_quantus() -> None:
    model, (x, y, a) = tiny_cnn(), batch()
    expected = run_quantus(
        quantus.FaithfulnessEstimate(features_in_step=STEP, abs=True, perturb_baseline=0.0, disable_warnings=True),
        model, x, y, a,
    )
    np.testing.assert_allclose(ours(FaithfulnessEstimate(model), x, a, y), expected, rtol=RTOL)


def test_faithfulness_correlation_patches_match_quantus(monkeypatch: pytest.MonkeyPatch) -> None:
    model, (x, y, a) = tiny_cnn(), batch()
    patch = SIDE // 4  # the paper's 56 on 224
    flat = np.arange(3 * SIDE * SIDE).reshape(3, SIDE, SIDE)
    blocks = [flat[:, r : r + patch, c : c + patch].ravel() for r in range(0, SIDE, patch) for c in range(0, SIDE, patch)]
    calls = iter(range(10**6))
    # Quantus draws one random subset per sample and run; hand it block `run` instead.
    monkeypatch.setattr(np.random, "choice", lambda n, size, replace=True: blocks[next(calls) // BATCH])
    expected = run_quantus(
        quantus.FaithfulnessCorrelation(
            nr_runs=len(blocks), subset_size=3 * patch * patch, abs=True, perturb_baseline=0.0,
            return_aggregate=False, disable_warnings=True,
        ),
        model, x, y, a,
    )
    monkeypatch.undo()
    np.testing.assert_allclose(ours(FaithfulnessCorrelation(model), x, a, y), expected, rtol=RTOL)


@pytest.mark.parametrize("baseline", [0.0, "uniform"])
def test_infidelity_matches_quantus(baseline: float | str) -> None:
    model, (x, y, a) = tiny_cnn(), batch()
    metric = Infidelity(model, baseline=baseline, seed=3)
    draws = record_draws(metric)
    mine = ours(metric, x, a, y)
    if baseline == "uniform":  # one (blocks, B) draw per round and patch size, in Quantus's loop order
        assert len(draws) == 5 * 2
        perturb = replay_constants(iter([row.numpy() for draw in draws for row in draw]))
        options: dict[str, Any] = {"perturb_func": perturb}
    else:
        assert not draws
        options = {"perturb_baseline": 0.0}
    expected = run_quantus(
        quantus.Infidelity(
            perturb_patch_sizes=[SIDE // 2, SIDE // 4], n_perturb_samples=5, loss_func=optimal_scaling_loss,
            disable_warnings=True, **options,
        ),
        model, x, y, a,
    )
    np.testing.assert_allclose(mine, expected, rtol=RTOL)


def test_monotonicity_correlation_matches_quantus() -> None:
    model, (x, y, a) = tiny_cnn(), batch()
    metric = MonotonicityCorrelation(model, samples=3, seed=1)  # 3 of the paper's 10 draws keep the test fast
    draws = record_draws(metric)
    mine = ours(metric, x, a, y)
    (values,) = draws  # (steps, draws, B): Quantus loops steps, then draws
    expected = run_quantus(
        quantus.MonotonicityCorrelation(
            nr_samples=3, features_in_step=STEP, perturb_func=replay_constants(iter(values.reshape(-1, BATCH).numpy())),
            disable_warnings=True,
        ),
        model, x, y, a, softmax=True,
    )
    np.testing.assert_allclose(mine, expected, rtol=RTOL)


def test_max_sensitivity_matches_quantus_through_the_adapter() -> None:
    model, (x, y, _) = tiny_cnn(), batch()
    explainer = SoftPullback(model)
    a = explainer.attribute(x, y)
    metric = MaxSensitivity(model, explainer, samples=3)
    draws = record_draws(metric)
    mine = ours(metric, x, a, y)
    noise = iter([d.reshape(BATCH, -1).numpy() for d in draws])
    expected = run_quantus(
        quantus.MaxSensitivity(nr_samples=3, perturb_func=lambda arr, indices, **_: arr + next(noise), disable_warnings=True),
        model, x, y, a, explain_func=QuantusExplainFunc(explainer),
    )
    np.testing.assert_allclose(mine, expected, rtol=RTOL)


def test_random_logit_matches_quantus_through_the_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    model, (x, y, _) = tiny_cnn(), batch()
    explainer = SoftPullback(model)
    a = explainer.attribute(x, y)
    metric = RandomLogit(model, explainer, seed=5)
    draws = record_draws(metric, "_randint")
    mine = ours(metric, x, a, y)
    (draw,) = draws
    # Quantus picks index `draw` among the classes other than the target, as we do.
    monkeypatch.setattr(np.random, "randint", lambda low, high, size: draw.numpy())
    expected = run_quantus(
        quantus.RandomLogit(num_classes=10, similarity_func=quantus.similarity_func.correlation_pearson,
                            disable_warnings=True),
        model, x, y, a, explain_func=QuantusExplainFunc(explainer),
    )
    np.testing.assert_allclose(mine, expected, rtol=RTOL)


def test_focus_matches_quantus() -> None:
    model, (x, y, a) = tiny_cnn(), batch()
    tile_labels = torch.stack([torch.tensor([t, t, (t + 1) % 10, (t + 2) % 10])[torch.randperm(4)] for t in y.tolist()])
    positions = (tile_labels == y[:, None]).int().tolist()
    expected = run_quantus(quantus.Focus(disable_warnings=True), model, x, y, x * a, custom_batch=positions)
    np.testing.assert_allclose(ours(Focus(model), x, a, y, tile_labels), expected, rtol=RTOL)


@pytest.mark.parametrize("cls, reference", [(PointingGame, "PointingGame"), (RelevanceMass, "RelevanceMassAccuracy")])
def test_mask_metrics_match_quantus(cls: type, reference: str) -> None:
    model, (x, y, a) = tiny_cnn(), batch()
    relevance = a.sum(dim=1, keepdim=True)  # Quantus wants one-channel attributions next to (B, 1, H, W) masks
    masks = torch.rand(BATCH, 1, SIDE, SIDE, generator=torch.Generator().manual_seed(2)) > 0.6
    masks[0] = relevance[0] == relevance[0].max()  # one sure hit for the pointing game
    expected = run_quantus(
        getattr(quantus, reference)(disable_warnings=True), model, x, y, relevance, s_batch=masks.numpy().astype(np.float32)
    )
    np.testing.assert_allclose(ours(cls(model), x, relevance, y, masks), expected, rtol=RTOL)
