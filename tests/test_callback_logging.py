"""Schedule, outputs (TensorBoard tags, PNG fallback, scalars), labels and de-normalisation, resuming."""

from __future__ import annotations

import csv
import glob
import math
import os
import sys
import threading
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import sp_lightning.callbacks.semantic_pullback as module
from callback_support import (  # noqa: F401  (one_thread is a fixture)
    CLASS_NAMES, MEAN, STD, BlobData, TinyClassifier, blob_images, one_thread, trainer_kwargs,
)
from sp_lightning import PullbackAscent, SemanticPullbackCallback, SoftPullback
from sp_lightning.callbacks import Explanations
from sp_lightning.metrics import FaithfulnessCorrelation, RandomLogit

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:SemanticPullbackCallback found no TensorBoardLogger"),
]

STEPS_PER_EPOCH = 4  # BlobData: 64 training images, batch 16


def mock_explain(callback: SemanticPullbackCallback, trainer_box: dict[str, Any]) -> list[tuple[int, bool]]:
    """Replace the explanation with a cheap fake of the right shapes; returns the (step, sanity) calls it sees."""
    calls: list[tuple[int, bool]] = []

    def explain(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor | None) -> Explanations:
        trainer = trainer_box["trainer"]
        calls.append((trainer.global_step, trainer.sanity_checking))
        n, _, h, w = images.shape
        targets = torch.arange(callback.top_k + 1).repeat(n, 1)
        return Explanations(
            probabilities=torch.full((n, 4), 0.25),
            targets=targets,
            soft_maps=torch.randn(n, callback.top_k + 1, h, w),
            gradient_maps=torch.randn(n, h, w),
            cosine=torch.rand(n),
            counterfactual_targets=targets[:, :2],
            counterfactuals=images[:, None].expand(n, 2, *images.shape[1:]).cpu().float(),
            logit_gain=torch.ones(n, 2),
            probability_gain=torch.full((n, 2), 0.1),
        )

    callback.explain = explain  # type: ignore[method-assign]
    return calls


def fit(callback: SemanticPullbackCallback, tmp_path: Any, mock: bool = True, **overrides: Any) -> tuple[pl.Trainer, list]:
    box: dict[str, Any] = {}
    calls = mock_explain(callback, box) if mock else []
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, **overrides))
    box["trainer"] = trainer
    trainer.fit(TinyClassifier(), datamodule=BlobData())
    return trainer, calls


def events(log_dir: str) -> EventAccumulator:
    accumulator = EventAccumulator(log_dir, size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def test_baseline_at_fit_start_then_every_epoch_never_in_sanity_check(tmp_path) -> None:
    _, calls = fit(SemanticPullbackCallback(num_images=2), tmp_path, max_epochs=3, num_sanity_val_steps=2)
    assert calls == [(0, False), (4, False), (8, False), (12, False)]


@pytest.mark.parametrize(
    ("options", "epochs", "steps"),
    [
        (dict(every_n_epochs=None, every_n_steps=3), 2, [0, 3, 6]),
        (dict(every_n_epochs=2, log_at_fit_start=False), 4, [8, 16]),
        (dict(every_n_epochs=1, every_n_steps=2), 2, [0, 2, 4, 6, 8]),  # epoch ends coincide: no duplicates
    ],
)
def test_every_n_steps_and_epochs(tmp_path, options: dict, epochs: int, steps: list[int]) -> None:
    _, calls = fit(SemanticPullbackCallback(num_images=2, **options), tmp_path, max_epochs=epochs)
    assert [step for step, _ in calls] == steps


def test_tensorboard_stable_tags_readable_images_and_scalars(tmp_path) -> None:
    callback = SemanticPullbackCallback(num_images=3)
    fit(callback, tmp_path, mock=False, logger=TensorBoardLogger(str(tmp_path)))
    (log_dir,) = glob.glob(str(tmp_path / "lightning_logs" / "version_*"))
    acc = events(log_dir)
    image_tags = {f"semantic_pullback/probe_{i:02d}" for i in range(3)} | {"semantic_pullback/overview"}
    assert set(acc.Tags()["images"]) == image_tags
    for tag in image_tags:
        logged = acc.Images(tag)
        assert [e.step for e in logged] == [0, STEPS_PER_EPOCH]
        assert min(e.height for e in logged) >= 128 and min(e.width for e in logged) >= 128
    scalars = set(acc.Tags()["scalars"])
    for name in ("seconds", "cosine_gradient_sp", "counterfactual_logit_gain", "counterfactual_probability_gain",
                 "counterfactual_logit_gain_runner_up", "counterfactual_probability_gain_runner_up"):
        assert [e.step for e in acc.Scalars(f"semantic_pullback/{name}")] == [0, STEPS_PER_EPOCH]
    assert "semantic_pullback/drift_correlation" in scalars
    (drift,) = acc.Scalars("semantic_pullback/drift_correlation")  # needs a previous log
    assert drift.step == STEPS_PER_EPOCH and -1.0 <= drift.value <= 1.0
    assert all(-1.0 <= e.value <= 1.0 for e in acc.Scalars("semantic_pullback/cosine_gradient_sp"))
    assert all(e.value > 0 for e in acc.Scalars("semantic_pullback/seconds"))


def test_chosen_metrics_are_logged_as_probe_set_means(tmp_path) -> None:
    callback = SemanticPullbackCallback(num_images=3, metrics=["faithfulness_correlation", "random_logit"])
    trainer, _ = fit(callback, tmp_path, mock=False, logger=TensorBoardLogger(str(tmp_path)))
    acc = events(trainer.logger.log_dir)
    assert {t for t in acc.Tags()["scalars"] if "/metrics/" in t} == {
        "semantic_pullback/metrics/faithfulness_correlation", "semantic_pullback/metrics/random_logit"
    }
    logged = {name: acc.Scalars(f"semantic_pullback/metrics/{name}") for name in ("faithfulness_correlation", "random_logit")}
    for values in logged.values():
        assert [e.step for e in values] == [0, STEPS_PER_EPOCH]
        assert all(math.isfinite(e.value) and -1.0 <= e.value <= 1.0 for e in values)
    # the last log scored the final model's Soft Pullback toward the true label: the metrics by hand, same seed
    model, probe = trainer.lightning_module, callback.probe
    attributions = SoftPullback(model).attribute(probe.images, probe.labels)
    for name, metric in (
        ("faithfulness_correlation", FaithfulnessCorrelation(model)),
        ("random_logit", RandomLogit(model, SoftPullback(model), seed=callback.seed)),
    ):
        metric.update(probe.images, attributions, probe.labels)
        assert logged[name][-1].value == pytest.approx(float(metric.compute()), rel=1e-4, abs=1e-6), name
    # the metrics draw from their own generator: the global RNG's state changes nothing
    scores = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        scores.append(callback.explain(model, probe.images, probe.labels).metric_scores)
    assert scores[0].shape == (3, 2) and torch.equal(scores[0], scores[1])


def test_png_fallback_with_one_warning_and_scalars_in_other_loggers(tmp_path) -> None:
    callback = SemanticPullbackCallback(num_images=2)
    logger = CSVLogger(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(callback, tmp_path, max_epochs=2, logger=logger)
    messages = [str(w.message) for w in caught if "no TensorBoardLogger" in str(w.message)]
    assert len(messages) == 1 and logger.log_dir in messages[0]
    for tag in ("probe_00", "probe_01", "overview"):
        files = sorted(os.listdir(os.path.join(logger.log_dir, "semantic_pullback", tag)))
        assert files == [f"step_{s:08d}.png" for s in (0, 4, 8)]
    with open(os.path.join(logger.log_dir, "metrics.csv")) as handle:
        rows = list(csv.DictReader(handle))
    logged = [int(r["step"]) for r in rows if r.get("semantic_pullback/seconds")]
    assert logged == [0, 4, 8]


def thread_priority() -> int | None:
    """The calling thread's nice value (per thread on Linux; None elsewhere, where the callback leaves it)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if sys.platform.startswith("linux") else None


def test_images_are_drawn_off_the_training_thread_and_match_inline_drawing(tmp_path) -> None:
    on_main: dict[bool, set[bool]] = {}
    priorities: dict[bool, set[int]] = {}
    written: dict[bool, list[tuple[int, dict[str, torch.Tensor]]]] = {}
    training_priority = thread_priority()
    for background in (True, False):
        callback = SemanticPullbackCallback(num_images=2, background=background)
        write = callback._write

        def recording(trainer: pl.Trainer, step: int, panels: dict, background: bool = background, write=write) -> None:
            on_main.setdefault(background, set()).add(threading.current_thread() is threading.main_thread())
            priorities.setdefault(background, set()).add(thread_priority())
            written.setdefault(background, []).append((step, panels))
            write(trainer, step, panels)

        callback._write = recording  # type: ignore[method-assign]
        pl.seed_everything(0, verbose=False)  # the mocked explanation draws random maps: the same ones both times
        fit(callback, tmp_path / str(background), max_epochs=2)
        assert callback._pending is None and callback._drawing is None  # finished and stopped when training ended
    assert on_main == {True: {False}, False: {True}}
    # The drawing thread yields to training (lowest priority); the training thread keeps its own.
    lowest = 19 if sys.platform.startswith("linux") else None
    assert priorities == {True: {lowest}, False: {training_priority}} and thread_priority() == training_priority
    assert [step for step, _ in written[True]] == [step for step, _ in written[False]] == [0, 4, 8]
    for (_, drawn), (_, inline) in zip(written[True], written[False]):
        assert drawn.keys() == inline.keys() and all(torch.equal(drawn[k], inline[k]) for k in drawn)


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_a_failure_while_drawing_in_the_background_is_reported(tmp_path, on_error: str) -> None:
    callback = SemanticPullbackCallback(num_images=2, on_error=on_error)

    def broken(result: Explanations) -> dict:
        raise ValueError("no ink")

    callback._render = broken  # type: ignore[method-assign]
    if on_error == "raise":  # step 0's failure surfaces at the next log (end of epoch 1) and stops training
        with pytest.raises(RuntimeError, match="failed at step 0: ValueError: no ink"):
            fit(callback, tmp_path, max_epochs=3)
        assert callback._drawing is None
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(callback, tmp_path, max_epochs=1)
    failed = [str(w.message) for w in caught if "ValueError: no ink" in str(w.message)]
    assert len(failed) == 2 and "failed at step 0" in failed[0] and "failed at step 4" in failed[1]
    assert trainer.global_step == STEPS_PER_EPOCH  # training went on
    assert callback._pending is None and callback._drawing is None


def test_png_fallback_without_any_logger_uses_the_root_dir(tmp_path) -> None:
    fit(SemanticPullbackCallback(num_images=2), tmp_path, logger=False)
    assert os.path.isfile(tmp_path / "semantic_pullback" / "overview" / "step_00000004.png")


def test_several_loggers_images_go_to_tensorboard(tmp_path) -> None:
    csv_logger, tb_logger = CSVLogger(str(tmp_path / "csv")), TensorBoardLogger(str(tmp_path / "tb"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(SemanticPullbackCallback(num_images=2), tmp_path, logger=[csv_logger, tb_logger])
    assert not any("no TensorBoardLogger" in str(w.message) for w in caught)
    assert not glob.glob(str(tmp_path / "**" / "*.png"), recursive=True)
    assert "semantic_pullback/overview" in events(tb_logger.log_dir).Tags()["images"]
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as handle:
        assert "semantic_pullback/cosine_gradient_sp" in handle.readline()


def record_panels(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Record what the callback passes to the (real) panel function."""
    seen: list[dict[str, Any]] = []
    real = module.explanation_panel

    def spy(image, maps, map_captions, counterfactuals=None, counterfactual_captions=(), **kwargs):
        seen.append(dict(image=image, captions=map_captions, cf=counterfactuals, cf_captions=counterfactual_captions,
                         **kwargs))
        return real(image, maps, map_captions, counterfactuals, counterfactual_captions, **kwargs)

    monkeypatch.setattr(module, "explanation_panel", spy)
    return seen


def test_class_names_and_denormalisation_come_from_the_datamodule(tmp_path, monkeypatch) -> None:
    seen = record_panels(monkeypatch)
    callback = SemanticPullbackCallback(num_images=4, top_k=2, log_at_fit_start=False)
    fit(callback, tmp_path, mock=False)
    probe = callback.probe
    assert len(seen) == 8  # a full panel per image, then a compact one for the overview
    full = [panel for panel in seen if panel.get("differences", True)]
    compact = [panel for panel in seen if not panel.get("differences", True)]
    assert len(full) == len(compact) == 4
    for panel, summary in zip(full, compact):  # the overview: input | SP toward the true label | its counterfactual
        assert summary["captions"] == panel["captions"][:1] and summary["cf_captions"] == panel["cf_captions"][:1]
        assert torch.equal(summary["cf"], panel["cf"][:1]) and torch.equal(summary["image"], panel["image"])
    seen = full
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    for i, panel in enumerate(seen):
        true_name = CLASS_NAMES[int(probe.labels[i])]
        assert torch.allclose(panel["image"], (probe.images[i] * std + mean).clamp(0, 1), atol=1e-6)
        assert panel["input_caption"] == ["input", f"true: {true_name}"]
        assert panel["captions"][0] == [f"SP: {true_name}", panel["captions"][0][1]]
        assert panel["captions"][0][1].startswith("true p=")
        assert [c[0] for c in panel["captions"][1:3]] != [f"SP: {true_name}"] * 2  # rivals are other classes
        assert panel["captions"][3][0] == f"gradient: {true_name}"
        assert panel["cf_captions"][0][0] == f"PA: {true_name}" and panel["cf"].shape == (2, 3, 16, 16)
        assert 0.0 <= float(panel["cf"].min()) and float(panel["cf"].max()) <= 1.0
        assert panel["title"].startswith(f"probe {i}: true {true_name} | predicted ")


def test_user_class_names_override_and_unnamed_classes(tmp_path, monkeypatch) -> None:
    seen = record_panels(monkeypatch)
    fit(SemanticPullbackCallback(num_images=1, class_names=["a", "b", "c", "d"], every_n_epochs=None), tmp_path,
        mock=False)
    assert seen[0]["captions"][0][0] in {"SP: a", "SP: b", "SP: c", "SP: d"}

    class Unnamed(BlobData):
        def __init__(self) -> None:
            super().__init__()
            del self.class_names

    seen.clear()
    callback = SemanticPullbackCallback(num_images=1, every_n_epochs=None)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path))
    trainer.fit(TinyClassifier(), datamodule=Unnamed())
    assert seen[0]["captions"][0][0] == f"SP: class {int(callback.probe.labels[0])}"


def test_counterfactuals_are_clipped_to_the_valid_input_range(tmp_path) -> None:
    callback = SemanticPullbackCallback(num_images=4, every_n_epochs=None)
    trainer, _ = fit(callback, tmp_path, mock=False)
    low, high = callback._bounds
    assert torch.allclose(low, -torch.tensor(MEAN) / torch.tensor(STD))
    assert torch.allclose(high, (1 - torch.tensor(MEAN)) / torch.tensor(STD))
    result = callback.explain(trainer.lightning_module, callback.probe.images, callback.probe.labels)
    cf = result.counterfactuals
    assert (cf >= low.view(3, 1, 1) - 1e-6).all() and (cf <= high.view(3, 1, 1) + 1e-6).all()
    assert not torch.equal(cf[:, 0], callback.probe.images)  # it moved


def test_counterfactuals_reuse_the_soft_pullback_and_equal_a_fresh_ascent(tmp_path, monkeypatch) -> None:
    callback = SemanticPullbackCallback(num_images=4, every_n_epochs=None)
    trainer, _ = fit(callback, tmp_path, mock=False)
    model, probe = trainer.lightning_module, callback.probe
    given: list[Any] = []
    ascend = module.PullbackAscent.ascend

    def spy(self: PullbackAscent, *args: Any, **kwargs: Any) -> Any:
        given.append(kwargs.get("first"))
        return ascend(self, *args, **kwargs)

    monkeypatch.setattr(module.PullbackAscent, "ascend", spy)
    result = callback.explain(model, probe.images, probe.labels)
    assert given[0] is not None and given[0].shape[1] == 2  # the first step came from the Soft Pullback
    fresh = PullbackAscent(model, callback._alpha, callback.ascent_steps, clip="every", bounds=callback._bounds)
    expected = fresh.ascend(probe.images, result.counterfactual_targets).counterfactual
    torch.testing.assert_close(result.counterfactuals, expected)


def test_unknown_normalisation_falls_back_to_the_probe_range_with_a_warning(tmp_path) -> None:
    images, labels = blob_images(6)  # normalised, outside [0, 1], and no mean/std given
    callback = SemanticPullbackCallback(images=images, labels=labels.tolist(), every_n_epochs=None)
    box: dict[str, Any] = {}
    mock_explain(callback, box)
    trainer = box["trainer"] = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path))
    with pytest.warns(UserWarning, match="probe set's own range"):  # no datamodule, no validation data
        trainer.fit(TinyClassifier(), train_dataloaders=BlobData().train_dataloader())
    low, high = callback._bounds
    assert torch.equal(low, images.amin(dim=(0, 2, 3))) and torch.equal(high, images.amax(dim=(0, 2, 3)))
    assert torch.equal(callback.probe.images, images)  # the user's images, all of them


def test_user_mean_std_and_images_from_a_file(tmp_path, monkeypatch) -> None:
    images, labels = blob_images(3)
    path = tmp_path / "probe.pt"
    torch.save({"images": images, "labels": labels}, path)
    seen = record_panels(monkeypatch)
    callback = SemanticPullbackCallback(images=str(path), mean=[0.0, 0.0, 0.0], std=[2.0, 2.0, 2.0],
                                        every_n_epochs=None, counterfactual=False, gradient=False)
    fit(callback, tmp_path, mock=False)
    assert torch.equal(callback.probe.labels, labels)
    assert torch.allclose(seen[0]["image"], (images[0] * 2.0).clamp(0, 1))
    assert seen[0]["cf"] is None and len(seen[0]["captions"]) == 4  # no gradient tile, no counterfactuals


def test_probe_set_survives_resuming_from_a_checkpoint(tmp_path) -> None:
    first = SemanticPullbackCallback(num_images=4)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    box: dict[str, Any] = {}
    mock_explain(first, box)
    trainer = pl.Trainer(callbacks=[first, checkpoint], **trainer_kwargs(tmp_path, enable_checkpointing=True))
    box["trainer"] = trainer
    trainer.fit(TinyClassifier(), datamodule=BlobData())

    resumed = SemanticPullbackCallback(num_images=4, seed=99)  # another seed: would pick other images
    box2: dict[str, Any] = {}
    calls = mock_explain(resumed, box2)
    trainer2 = pl.Trainer(callbacks=[resumed], **trainer_kwargs(tmp_path, max_epochs=2))
    box2["trainer"] = trainer2
    trainer2.fit(TinyClassifier(), datamodule=BlobData(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(resumed.probe.images, first.probe.images)
    assert torch.equal(resumed.probe.labels, first.probe.labels)
    assert resumed.probe.indices == first.probe.indices
    assert [step for step, _ in calls] == [8]  # the resume step (4) was already logged before saving


def test_state_dict_round_trip() -> None:
    images, labels = blob_images(3)
    state = {"images": images, "labels": labels, "indices": [4, 0, 9], "previous": torch.rand(3, 16, 16),
             "last_step": 12}
    callback = SemanticPullbackCallback(num_images=3)
    assert callback.probe is None
    callback.load_state_dict(state)
    assert torch.equal(callback.probe.images, images) and torch.equal(callback.probe.labels, labels)
    saved = callback.state_dict()
    assert set(saved) == set(state) and saved["indices"] == [4, 0, 9] and saved["last_step"] == 12
    assert all(torch.equal(saved[k], state[k]) for k in ("images", "labels", "previous"))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        callback.load_state_dict({**state, "images": torch.rand(3, 16, 16)})
    assert callback.state_key != SemanticPullbackCallback(tag="other").state_key


def _explanations(index: torch.Tensor) -> Explanations:
    """Fake results whose every field encodes the probe index."""
    n = len(index)
    value = index.float()
    return Explanations(
        probabilities=value[:, None].expand(n, 4).clone(),
        targets=index[:, None].expand(n, 2).clone(),
        soft_maps=value.view(n, 1, 1, 1).expand(n, 2, 3, 3).clone(),
        counterfactuals=value.view(n, 1, 1, 1, 1).expand(n, 2, 3, 3, 3).clone(),
        metric_scores=value[:, None].expand(n, 2).clone(),
    )


@pytest.mark.parametrize(("count", "world_size"), [(5, 2), (5, 3), (3, 4)])
def test_merge_shards_restores_probe_order(count: int, world_size: int) -> None:
    index = torch.arange(count)
    shards = [_explanations(index[rank::world_size]) if rank < count else None for rank in range(world_size)]
    merged = module.merge_shards(shards, world_size)
    expected = _explanations(index)
    for name in ("probabilities", "targets", "soft_maps", "counterfactuals", "metric_scores"):
        assert torch.equal(getattr(merged, name), getattr(expected, name)), name
    assert merged.gradient_maps is None and merged.cosine is None


def test_correlation_of_maps() -> None:
    maps = torch.randn(3, 5, 5)
    constant = torch.ones(3, 5, 5)
    assert torch.allclose(module.correlation(maps, maps), torch.ones(3))
    assert torch.allclose(module.correlation(maps, -2 * maps + 1), -torch.ones(3))
    assert torch.equal(module.correlation(maps, constant), torch.zeros(3))
