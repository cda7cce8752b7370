"""Guarantees of sp_lightning.metrics beyond agreement with Quantus: state, RNG, modes, scaling, known answers."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
from _metrics_support import BATCH, METRIC_NAMES, SIDE, STOCHASTIC, all_metrics, batch, cnn_with_train_layers, record_draws, tiny_cnn
from torch import nn

from sp_lightning import Gradient, SoftPullback
from sp_lightning.metrics import (
    ExplanationMetric,
    ExplanationScores,
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
)
from sp_lightning.metrics.base import scaled_patch, scaled_step


def scores(metric, x, a, y, extra=()) -> torch.Tensor:
    metric.update(x, a, y, *extra)
    return metric.per_sample_scores()


# ---------------------------------------------------------------- state, modes, RNG


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_eval_mode_used_modes_and_model_state_restored_global_rng_untouched(name: str) -> None:
    model = cnn_with_train_layers()
    model[3].eval()  # a mixed state must come back exactly
    flags = [m.training for m in model.modules()]
    weights = copy.deepcopy(model.state_dict())
    x, y, a = batch()
    metric, extra = all_metrics(model)[name]
    torch_rng, py_rng, np_rng = torch.get_rng_state(), random.getstate(), np.random.get_state()
    got = scores(metric, x, a, y, extra)
    metric.compute()
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert random.getstate() == py_rng
    assert all(np.array_equal(p, q) for p, q in zip(np.random.get_state(), np_rng))
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # BN statistics untouched
    reference = copy.deepcopy(model).eval()
    metric_eval, extra = all_metrics(reference)[name]
    torch.testing.assert_close(got, scores(metric_eval, x, a, y, extra), equal_nan=True)


def test_modes_restored_when_the_model_call_fails() -> None:
    model = cnn_with_train_layers()

    def broken(output: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    x, y, a = batch()
    with pytest.raises(RuntimeError, match="boom"):
        FaithfulnessCorrelation(model, logits_fn=broken).update(x, a, y)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize("name", METRIC_NAMES)
def test_inference_mode_gives_the_same_scores(name: str) -> None:
    model = tiny_cnn()
    x, y, a = batch()
    outside_metric, extra = all_metrics(model)[name]
    outside = scores(outside_metric, x, a, y, extra)
    metric, extra = all_metrics(model)[name]
    with torch.inference_mode():
        metric.update(x.clone(), a.clone(), y.clone(), *extra)
        value = metric.compute()
    torch.testing.assert_close(metric.per_sample_scores(), outside, equal_nan=True)
    assert torch.isfinite(value)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_randomness_is_seeded_fresh_per_update_and_replayable(name: str) -> None:
    model = tiny_cnn()
    x, y, a = batch()
    if name in ("MaxSensitivity", "RandomLogit"):
        a = SoftPullback(model).attribute(x, y)
    first, _ = all_metrics(model, seed=11)[name]
    same, _ = all_metrics(model, seed=11)[name]
    other, _ = all_metrics(model, seed=12)[name]
    for metric in (first, same, other):
        metric.update(x, a, y)
    assert torch.equal(first.per_sample_scores(), same.per_sample_scores())
    assert not torch.equal(first.per_sample_scores(), other.per_sample_scores())
    first.update(x, a, y)  # the stream moves on: a second pass draws new perturbations
    twice = first.per_sample_scores()
    assert not torch.equal(twice[:BATCH], twice[BATCH:])
    first.reset()
    first.reseed()
    first.update(x, a, y)
    assert torch.equal(first.per_sample_scores(), twice[:BATCH])


def test_accumulation_forward_reset_and_nan_handling() -> None:
    model = tiny_cnn()
    x, y, a = batch()
    metric = FaithfulnessCorrelation(model)
    batch_mean = metric(x, a, y)  # forward: this batch's value, and accumulated
    metric.update(x[:2], a[:2], y[:2])
    per_sample = metric.per_sample_scores()
    assert per_sample.shape == (BATCH + 2,)
    torch.testing.assert_close(batch_mean, per_sample[:BATCH].mean())
    torch.testing.assert_close(metric.compute(), per_sample.mean())
    metric.reset()
    assert metric.per_sample_scores().numel() == 0
    flat = torch.ones_like(a)  # a constant attribution: the correlation is undefined (NaN)
    metric.update(x[:1], flat[:1], y[:1])
    metric.update(x[1:], a[1:], y[1:])
    with pytest.warns(UserWarning, match="1 of 4 per-sample scores are NaN"):
        value = metric.compute()
    torch.testing.assert_close(value, metric.per_sample_scores()[1:].mean())


def test_model_is_borrowed_not_registered() -> None:
    model = tiny_cnn()
    metric = MaxSensitivity(model, SoftPullback(model))
    assert list(metric.children()) == []
    assert not any(key.startswith("model") for key in metric.state_dict())
    metric.to(torch.float64)
    assert next(model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("name", ["FaithfulnessEstimate", "FaithfulnessCorrelation", "Infidelity", "MonotonicityCorrelation", "MaxSensitivity"])
def test_chunk_size_does_not_change_scores(name: str) -> None:
    model = tiny_cnn()
    x, y, a = batch()
    if name == "MaxSensitivity":
        a = SoftPullback(model).attribute(x, y)
    small, _ = all_metrics(model)[name]
    large, _ = all_metrics(model)[name]
    small.batch_size, large.batch_size = 3, 10_000
    torch.testing.assert_close(scores(small, x, a, y), scores(large, x, a, y), rtol=1e-5, atol=1e-6)


def test_one_channel_attributions_are_broadcast_over_channels() -> None:
    model = tiny_cnn()
    x, y, a = batch()
    one = a[:, :1]
    full = FaithfulnessCorrelation(model)
    torch.testing.assert_close(scores(FaithfulnessCorrelation(model), x, one, y), scores(full, x, one.expand_as(x), y))
    torch.testing.assert_close(scores(FaithfulnessCorrelation(model), x, one[:, 0], y), full.per_sample_scores())


# ---------------------------------------------------------------- paper defaults and their scaling


class CountingModel(nn.Module):
    """A cheap classifier that counts the inputs it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(12, 10)
        self.seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        return self.head(self.pool(x).flatten(1))


@pytest.mark.parametrize(
    "build, calls",
    [
        (lambda m: FaithfulnessEstimate(m), 48),  # 3136-element steps: 48 of them
        (lambda m: FaithfulnessCorrelation(m), 16),  # 56x56 blocks: 4x4
        (lambda m: Infidelity(m), 5 * (4 + 16)),  # 112 and 56 patches, 5 rounds
        (lambda m: MonotonicityCorrelation(m), 48 * 10),  # 48 steps, 10 draws
    ],
)
@pytest.mark.parametrize("side", [224, 32])
def test_paper_defaults_at_224_and_scaled_to_other_sizes(build, calls: int, side: int) -> None:
    model = CountingModel()
    x = torch.rand(1, 3, side, side) * 2 - 1
    build(model).update(x, torch.randn_like(x), 0)
    assert model.seen == calls + 1  # plus the clean forward
    assert scaled_patch(112, side, side) == side // 2 and scaled_patch(56, side, side) == side // 4
    assert scaled_step(3136, 3 * side * side) == 3 * side * side // 48


def test_non_square_and_non_divisible_sizes_cover_the_whole_image() -> None:
    model = CountingModel()
    x = torch.rand(2, 3, 30, 45) * 2 - 1
    metric = FaithfulnessCorrelation(model)  # patch round(56 * 30 / 224) = 8: a 4 x 6 grid, narrower last blocks
    metric.update(x, torch.randn_like(x), torch.tensor([1, 2]))
    assert model.seen == 2 * (4 * 6 + 1)
    assert torch.isfinite(metric.compute())


# ---------------------------------------------------------------- known answers


def linear_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 10)).eval()


def test_infidelity_is_zero_for_the_exact_explanation_of_a_linear_model_and_scale_invariant() -> None:
    model = linear_model()
    x, y, a = batch()
    weights = model[1].weight.detach()[y].view_as(x)  # f_c(x) - f_c(x~) = <w_c, x - x~> exactly
    exact = scores(Infidelity(model), x, weights, y)
    noisy = scores(Infidelity(model), x, a, y)
    assert (exact < 1e-8 * noisy).all()
    torch.testing.assert_close(scores(Infidelity(model), x, 3.5 * a, y), noisy, rtol=1e-5, atol=0)


@pytest.mark.parametrize("cls", [FaithfulnessEstimate, FaithfulnessCorrelation])
def test_faithfulness_is_one_when_attributions_are_the_logit_drops_of_a_linear_model(cls: type) -> None:
    model = linear_model()
    x, y, _ = batch()
    contributions = model[1].weight.detach()[y].view_as(x) * x  # removing (setting to 0) drops exactly these
    torch.testing.assert_close(scores(cls(model, abs=False), x, contributions, y), torch.ones(BATCH), rtol=1e-5, atol=1e-5)


def test_max_sensitivity_is_zero_for_a_constant_gradient() -> None:
    model = linear_model()
    x, y, _ = batch()
    explainer = Gradient(model)
    got = scores(MaxSensitivity(model, explainer), x, explainer.attribute(x, y), y)
    torch.testing.assert_close(got, torch.zeros(BATCH), atol=1e-6, rtol=0)


def test_random_logit_correlates_with_a_uniformly_drawn_other_class() -> None:
    model = linear_model()
    x, y, _ = batch(size=64)
    explainer = Gradient(model)
    metric = RandomLogit(model, explainer)
    draws = record_draws(metric, "_randint")
    got = scores(metric, x, explainer.attribute(x, y), y)
    other = draws[0] + (draws[0] >= y).long()
    assert (other != y).all() and set(other.tolist()) == set(range(10))
    rows = model[1].weight.detach()
    expected = torch.stack([torch.corrcoef(torch.stack([rows[t], rows[o]]))[0, 1] for t, o in zip(y, other)])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_focus_known_answers() -> None:
    model = tiny_cnn()
    x = torch.ones(2, 3, 8, 8)
    tiles = torch.tensor([[4, 1, 2, 4], [5, 5, 0, 1]])
    only_target = torch.zeros_like(x)
    only_target[0, :, :4, :4] = only_target[0, :, 4:, 4:] = 1.0  # quadrants 0 and 3 hold class 4
    only_target[1, :, :4, :] = 1.0  # quadrants 0 and 1 hold class 5
    only_target[:, :, 0, 0] -= 5.0  # negative relevance does not count
    torch.testing.assert_close(scores(Focus(model), x, only_target, torch.tensor([4, 5]), (tiles,)), torch.ones(2))
    torch.testing.assert_close(scores(Focus(model), x, torch.ones_like(x), torch.tensor([4, 5]), (tiles,)), torch.full((2,), 0.5))


def test_mask_metrics_known_answers_and_empty_masks() -> None:
    model = tiny_cnn()
    x = torch.ones(3, 1, 4, 4)
    a = torch.zeros_like(x)
    a[:, 0, 1, 1] = 3.0
    a[:, 0, 2, 2] = 1.0
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, 1, 1] = True  # holds the maximum and 3/4 of the mass
    masks[1, 2, 2] = True  # holds 1/4 of the mass, not the maximum
    pointing, mass = PointingGame(model), RelevanceMass(model)
    torch.testing.assert_close(scores(pointing, x, a, 0, (masks,)), torch.tensor([1.0, 0.0, torch.nan]), equal_nan=True)
    torch.testing.assert_close(scores(mass, x, a, 0, (masks,)), torch.tensor([0.75, 0.25, torch.nan]), equal_nan=True)
    with pytest.warns(UserWarning, match="NaN"):
        torch.testing.assert_close(pointing.compute(), torch.tensor(0.5))


# ---------------------------------------------------------------- mosaics


def test_make_mosaics_places_the_target_twice_and_distractors_elsewhere() -> None:
    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 16, 16, generator=g)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    torch_rng = torch.get_rng_state()
    mosaics = make_mosaics(images, labels, count=20, generator=5)
    assert torch.equal(torch.get_rng_state(), torch_rng)
    assert mosaics.images.shape == (20, 3, 16, 16)
    assert torch.equal(mosaics.tile_labels, labels[mosaics.sources])
    assert ((mosaics.tile_labels == mosaics.target[:, None]).sum(dim=1) == 2).all()
    targets = mosaics.sources[mosaics.tile_labels == mosaics.target[:, None]].view(20, 2)
    assert (targets[:, 0] != targets[:, 1]).all()  # two different images of the target class
    tiles = torch.nn.functional.interpolate(images, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    corners = [(0, 0), (0, 8), (8, 0), (8, 8)]
    for k, (r, c) in enumerate(corners):
        assert torch.equal(mosaics.images[:, :, r : r + 8, c : c + 8], tiles[mosaics.sources[:, k]])
    assert set(mosaics.tile_labels.argmax(dim=1).tolist()) != {0}  # quadrant order is random
    again = make_mosaics(images, labels, count=20, generator=5)
    assert torch.equal(again.images, mosaics.images)
    assert not torch.equal(make_mosaics(images, labels, count=20, generator=6).sources, mosaics.sources)


def test_make_mosaics_rejects_a_single_class() -> None:
    with pytest.raises(ValueError, match="at least two classes"):
        make_mosaics(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))


# ---------------------------------------------------------------- Quantus adapter


def test_quantus_adapter_returns_the_explainers_attributions() -> None:
    model = tiny_cnn()
    x, y, _ = batch()
    explainer = SoftPullback(model)
    adapter = QuantusExplainFunc(explainer)
    got = adapter(model=model, inputs=x.numpy(), targets=y.numpy(), device="cpu")
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, explainer.attribute(x, y).numpy(), rtol=1e-6)
    summed = QuantusExplainFunc(explainer, channel_reduction="sum")(model=model, inputs=x.numpy(), targets=y.numpy())
    np.testing.assert_allclose(summed, got.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)
    other = tiny_cnn(seed=9)  # e.g. a randomised copy from a Quantus randomisation metric
    np.testing.assert_allclose(
        adapter(model=other, inputs=x.numpy(), targets=y.numpy()), SoftPullback(other).attribute(x, y).numpy(), rtol=1e-6
    )
    assert explainer.model is model
    with pytest.raises(TypeError, match="configure the explainer"):
        adapter(model=model, inputs=x.numpy(), targets=y.numpy(), abs=True)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m, x, a, y: FaithfulnessEstimate(m).update(x, a[:, :, :4], y), ValueError, "do not fit inputs"),
        (lambda m, x, a, y: FaithfulnessEstimate(m).update(x, a, y[:, None].repeat(1, 2)), ValueError, "one target per input"),
        (lambda m, x, a, y: FaithfulnessEstimate(m).update(x, a, y.float()), TypeError, "integer class indices"),
        (lambda m, x, a, y: FaithfulnessEstimate(m).update(x, a, 10), ValueError, r"\[0, 9\]"),
        (lambda m, x, a, y: FaithfulnessEstimate(m).update(x.long(), a, y), TypeError, "floating-point"),
        (lambda m, x, a, y: FaithfulnessCorrelation(m).update(x.flatten(1), a.flatten(1), y), ValueError, r"\(B, C, H, W\)"),
        (lambda m, x, a, y: MaxSensitivity(m, SoftPullback(m)).update(x, a[:, :1], y), ValueError, "raw explainer output"),
        (lambda m, x, a, y: MaxSensitivity(m, SoftPullback(tiny_cnn(seed=4))), ValueError, "different model"),
        (lambda m, x, a, y: RandomLogit(m, object()), TypeError, "sp_lightning explainer"),
        (lambda m, x, a, y: RandomLogit(m, SoftPullback(m), num_classes=1), ValueError, "num_classes"),
        (lambda m, x, a, y: Infidelity(m, patch_sizes=[]), ValueError, "patch_sizes"),
        (lambda m, x, a, y: Infidelity(m, baseline="noise"), ValueError, "baseline"),
        (lambda m, x, a, y: MonotonicityCorrelation(m, uniform_range=(1.0, -1.0)), ValueError, "uniform_range"),
        (lambda m, x, a, y: MonotonicityCorrelation(m, samples=0), ValueError, "samples"),
        (lambda m, x, a, y: FaithfulnessEstimate(m, features_in_step=0), ValueError, "features_in_step"),
        (lambda m, x, a, y: FaithfulnessEstimate(m, batch_size=0), ValueError, "batch_size"),
        (lambda m, x, a, y: FaithfulnessEstimate("model"), TypeError, "torch.nn.Module"),
        (lambda m, x, a, y: Focus(m).update(x, a, y, torch.zeros(BATCH, 3, dtype=torch.long)), ValueError, "tile_labels"),
        (lambda m, x, a, y: Focus(m, relevance="gradient"), ValueError, "relevance"),
        (lambda m, x, a, y: PointingGame(m).update(x, a, y, torch.rand(BATCH, SIDE, SIDE)), ValueError, "only 0 and 1"),
        (lambda m, x, a, y: RelevanceMass(m).update(x, a, y, torch.ones(BATCH, 2, SIDE, SIDE)), ValueError, "masks must be"),
        (lambda m, x, a, y: QuantusExplainFunc(SoftPullback(m), channel_reduction="max"), ValueError, "channel_reduction"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(call, error: type, match: str) -> None:
    model = tiny_cnn()
    x, y, a = batch()
    with pytest.raises(error, match=match):
        call(model, x, a, y)


# ---------------------------------------------------------------- Lightning


def test_metrics_update_and_log_inside_lightning_validation() -> None:
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    net = tiny_cnn()
    x, y, a = batch(size=8)
    pullback = SoftPullback(net).attribute(x, y)

    class Validated(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.faithfulness = FaithfulnessCorrelation(net)
            self.sensitivity = MaxSensitivity(net, SoftPullback(net), samples=2)

        def validation_step(self, batch: list[torch.Tensor], index: int) -> None:
            inputs, attributions, target = batch
            assert torch.is_inference_mode_enabled()
            self.faithfulness.update(inputs, attributions, target)
            self.sensitivity.update(inputs, attributions, target)
            self.log("faithfulness", self.faithfulness)
            self.log("sensitivity", self.sensitivity)

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    (logged,) = trainer.validate(Validated(), DataLoader(TensorDataset(x, pullback, y), batch_size=4), verbose=False)
    direct = FaithfulnessCorrelation(net)
    direct.update(x, pullback, y)
    assert logged["faithfulness"] == pytest.approx(float(direct.compute()), rel=1e-5)
    sensitivity = MaxSensitivity(net, SoftPullback(net), samples=2)
    for start in (0, 4):  # the same two batches, so the same draws
        sensitivity.update(x[start : start + 4], pullback[start : start + 4], y[start : start + 4])
    assert logged["sensitivity"] == pytest.approx(float(sensitivity.compute()), rel=1e-5)


def test_per_channel_masks_broadcast_against_one_channel_attributions() -> None:
    model = tiny_cnn()
    x = torch.ones(1, 3, 4, 4)
    a = torch.zeros(1, 1, 4, 4)
    a[0, 0, 1, 1] = 3.0
    a[0, 0, 2, 2] = 1.0
    masks = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    masks[0, 2, 1, 1] = True  # only channel 2 of the peak pixel: the one-channel map counts once per channel
    assert scores(PointingGame(model), x, a, 0, (masks,)).tolist() == [1.0]
    torch.testing.assert_close(scores(RelevanceMass(model), x, a, 0, (masks,)), torch.tensor([3.0 / 12.0]))


# ---------------------------------------------------------------- ExplanationScores


def test_explanation_scores_feed_mask_metrics_relevance_and_the_others_raw_attributions() -> None:
    model = tiny_cnn()
    x, y, _ = batch()
    masks = torch.zeros(BATCH, SIDE, SIDE, dtype=torch.bool)
    masks[:, : SIDE // 2] = True
    explainers = {"gradient": Gradient(model), "sp": SoftPullback(model)}
    board = ExplanationScores(
        explainers,
        {
            "mass": lambda e: RelevanceMass(e.model),
            "faithfulness": lambda e: FaithfulnessCorrelation(e.model, abs=False),  # signed: raw != |.| summed
            "random_logit": lambda e: RandomLogit(e.model, e, num_classes=10),  # needs the raw, input-shaped maps
        },
    )
    maps = board.update(x, y, masks)
    result = board.compute()
    assert set(result) == set(explainers)
    for name, explainer in explainers.items():
        torch.testing.assert_close(maps[name], explainer.attribute(x, y))
        relevance = maps[name].abs().sum(dim=1, keepdim=True)
        expected = {
            "mass": scores_of(RelevanceMass(model), x, relevance, y, masks),
            "faithfulness": scores_of(FaithfulnessCorrelation(model, abs=False), x, maps[name], y),
            "random_logit": scores_of(RandomLogit(model, explainer, num_classes=10), x, maps[name], y),
        }
        assert result[name] == pytest.approx(expected)
    with pytest.raises(ValueError, match="masks"):
        board.update(x, y)


def scores_of(metric: ExplanationMetric, x: torch.Tensor, a: torch.Tensor, y: torch.Tensor, *extra: torch.Tensor) -> float:
    metric.update(x, a, y, *extra)
    return float(metric.compute())
