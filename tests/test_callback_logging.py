"""Schedule, outputs (TensorBoard tags, PNG fallback, scalars), labels and de-normalisation, resuming."""

from __future__ import annotations

import csv
import glob
import math
import os
import re
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

import sp_lightning.callbacks.writer as writer_module
import sp_lightning.display.panels as panels_module
import sp_lightning.probe.explain as explain_module
from callback_support import (  # noqa: F401  (one_thread is a fixture)
    CLASS_NAMES, MEAN, STD, BlobData, TinyClassifier, blob_images, one_thread, trainer_kwargs,
)
from sp_lightning import PullbackAscent, SemanticPullbackCallback, SoftPullback
from sp_lightning.probe import Explanations
from sp_lightning.metrics import FaithfulnessCorrelation, RandomLogit
from sp_lightning.sinks import ImageSink

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:No logger of this run shows images"),
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


def fit(
    callback: SemanticPullbackCallback, tmp_path: Any, mock: bool = True, callbacks_extra: list[Any] = (),
    ckpt_path: str | None = None, **overrides: Any,
) -> tuple[pl.Trainer, list]:
    box: dict[str, Any] = {}
    calls = mock_explain(callback, box) if mock else []
    trainer = pl.Trainer(callbacks=[callback, *callbacks_extra], **trainer_kwargs(tmp_path, **overrides))
    box["trainer"] = trainer
    trainer.fit(TinyClassifier(), datamodule=BlobData(), ckpt_path=ckpt_path)
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
    messages = [str(w.message) for w in caught if "No logger of this run shows images" in str(w.message)]
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


class RecordingSink(ImageSink):
    """A user sink: records on which thread, at which priority and what it was given."""

    def __init__(self) -> None:
        self.on_main: set[bool] = set()
        self.priorities: set[int | None] = set()
        self.written: list[tuple[int, str, dict[str, torch.Tensor]]] = []
        self.animations: list[tuple[str, str, int]] = []
        self.closed = 0

    def log_images(self, images: Any, step: int, caption: str) -> None:
        self.on_main.add(threading.current_thread() is threading.main_thread())
        self.priorities.add(thread_priority())
        self.written.append((step, caption, dict(images)))

    def log_animation(self, tag: str, path: str, step: int) -> None:
        self.animations.append((tag, path, step))

    def close(self) -> None:
        self.closed += 1


def test_images_are_drawn_off_the_training_thread_and_match_inline_drawing(tmp_path) -> None:
    sinks: dict[bool, RecordingSink] = {}
    training_priority = thread_priority()
    for background in (True, False):
        sink = sinks[background] = RecordingSink()
        callback = SemanticPullbackCallback(num_images=2, background=background, sinks=[sink], timelapse=False)
        pl.seed_everything(0, verbose=False)  # the mocked explanation draws random maps: the same ones both times
        fit(callback, tmp_path / str(background), max_epochs=2)
        assert callback._writer is None and sink.closed == 1  # finished and stopped when training ended
    assert sinks[True].on_main == {False} and sinks[False].on_main == {True}
    # The drawing thread yields to training (lowest priority); the training thread keeps its own.
    lowest = 19 if sys.platform.startswith("linux") else None
    assert sinks[True].priorities == {lowest} and sinks[False].priorities == {training_priority}
    assert thread_priority() == training_priority
    drawn, inline = sinks[True].written, sinks[False].written
    assert [(step, caption) for step, caption, _ in drawn] == [(0, "step 0 · epoch 0"), (4, "step 4 · epoch 0"),
                                                               (8, "step 8 · epoch 1")]
    assert [step for step, _, _ in inline] == [0, 4, 8]
    for (_, _, a), (_, _, b) in zip(drawn, inline):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_user_sink_gets_the_timelapse_files_of_the_run(tmp_path) -> None:
    sink = RecordingSink()
    logger = CSVLogger(str(tmp_path))
    fit(SemanticPullbackCallback(num_images=2, sinks=[sink]), tmp_path, max_epochs=2, logger=logger)
    steps = sorted({step for _, _, step in sink.animations})
    assert steps == [0, 4, 8]
    for tag, path, _ in sink.animations:
        assert path.startswith(logger.log_dir) and os.path.isfile(path), (tag, path)
    assert {tag for tag, _, _ in sink.animations} >= {"semantic_pullback/overview"}


@pytest.mark.parametrize("on_error", ["warn", "raise"])
def test_a_failure_while_drawing_in_the_background_is_reported(tmp_path, on_error: str, monkeypatch) -> None:
    callback = SemanticPullbackCallback(num_images=2, on_error=on_error)

    def broken(frame: Any) -> dict:
        raise ValueError("no ink")

    monkeypatch.setattr(writer_module, "render_panels", broken)
    if on_error == "raise":  # step 0's failure surfaces at the next log (end of epoch 1) and stops training
        with pytest.raises(RuntimeError, match="failed at step 0: ValueError: no ink"):
            fit(callback, tmp_path, max_epochs=3)
        assert callback._writer is None
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, _ = fit(callback, tmp_path, max_epochs=1)
    failed = [str(w.message) for w in caught if "ValueError: no ink" in str(w.message)]
    assert len(failed) == 2 and "failed at step 0" in failed[0] and "failed at step 4" in failed[1]
    assert trainer.global_step == STEPS_PER_EPOCH  # training went on
    assert callback._writer is None


def test_png_fallback_without_any_logger_uses_a_fresh_run_directory_per_run(tmp_path) -> None:
    for _ in range(2):
        fit(SemanticPullbackCallback(num_images=2), tmp_path, logger=False)
    runs = sorted(os.listdir(tmp_path / "semantic_pullback_logs"))
    assert runs == ["version_0", "version_1"]  # the second run never overwrites the first
    for run in runs:
        folder = tmp_path / "semantic_pullback_logs" / run / "semantic_pullback"
        assert sorted(os.listdir(folder / "overview")) == ["step_00000000.png", "step_00000004.png"]
        assert os.path.isfile(folder / "timelapse" / "overview.gif")


def test_several_loggers_images_go_to_tensorboard(tmp_path) -> None:
    csv_logger, tb_logger = CSVLogger(str(tmp_path / "csv")), TensorBoardLogger(str(tmp_path / "tb"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(SemanticPullbackCallback(num_images=2), tmp_path, logger=[csv_logger, tb_logger])
    assert not any("No logger of this run shows images" in str(w.message) for w in caught)
    assert not glob.glob(str(tmp_path / "**" / "*.png"), recursive=True)
    assert "semantic_pullback/overview" in events(tb_logger.log_dir).Tags()["images"]
    with open(os.path.join(csv_logger.log_dir, "metrics.csv")) as handle:
        assert "semantic_pullback/cosine_gradient_sp" in handle.readline()


class Drawn:
    """What the drawing thread got (frames) and made (each picture's title and tile captions)."""

    def __init__(self) -> None:
        self.frames: list[Any] = []
        self.pictures: dict[str, list[tuple[str, ...]]] = {}  # title -> caption of each tile

    def probe(self, index: int) -> tuple[str, list[tuple[str, ...]]]:
        (title,) = [t for t in self.pictures if f"· probe {index}:" in t]
        return title, self.pictures[title]


def record_panels(monkeypatch: pytest.MonkeyPatch) -> Drawn:
    """Record the frames given to the (real) panel function and the tiles of every picture it draws."""
    drawn = Drawn()
    render, tile_grid = writer_module.render_panels, panels_module.tile_grid

    def render_spy(frame: Any) -> Any:
        drawn.frames.append(frame)
        return render(frame)

    def grid_spy(tiles: Any, ncol: int, title: Any = (), **kwargs: Any) -> Any:
        drawn.pictures[title[0]] = [tile.caption for tile in tiles]
        return tile_grid(tiles, ncol=ncol, title=title, **kwargs)

    monkeypatch.setattr(writer_module, "render_panels", render_spy)
    monkeypatch.setattr(panels_module, "tile_grid", grid_spy)
    return drawn


def test_class_names_and_denormalisation_come_from_the_datamodule(tmp_path, monkeypatch) -> None:
    drawn = record_panels(monkeypatch)
    callback = SemanticPullbackCallback(num_images=4, top_k=2, log_at_fit_start=False)
    fit(callback, tmp_path, mock=False)
    probe, (frame,) = callback.probe, drawn.frames
    mean, std = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
    assert torch.allclose(frame.images, (probe.images * std + mean).clamp(0, 1), atol=1e-6)
    assert frame.class_names == tuple(CLASS_NAMES) and (frame.step, frame.epoch) == (4, 0)
    counterfactuals = frame.explanations.counterfactuals
    assert counterfactuals.shape == (4, 2, 3, 16, 16)
    assert 0.0 <= float(counterfactuals.min()) and float(counterfactuals.max()) <= 1.0  # display space
    assert len(drawn.pictures) == 5  # a panel per probe image and the overview
    for i in range(4):
        true_name = CLASS_NAMES[int(probe.labels[i])]
        title, captions = drawn.probe(i)
        assert title.startswith(f"step 4 · epoch 0 · probe {i}: true {true_name}, predicted ")
        assert captions[0] == ("input", f"true {true_name}")
        assert captions[1][0] == f"SP: {true_name}" and captions[1][1].startswith("true p=")
        assert [c[0] for c in captions[2:4]] != [f"SP: {true_name}"] * 2  # rivals are other classes
        assert captions[4][0] == f"grad: {true_name}"
        assert captions[5][0] == f"PA: {true_name}" and captions[6] == ("PA - input", "grey: same")
        assert len(captions) == 9  # input, 3 SP, gradient, 2 x (counterfactual, difference)
    (overview,) = [t for t in drawn.pictures if "probe" not in t]
    assert overview == "step 4 · epoch 0 · input | SP toward the true class | its counterfactual"
    assert len(drawn.pictures[overview]) == 4 * 3


def test_user_class_names_override_and_unnamed_classes(tmp_path, monkeypatch) -> None:
    drawn = record_panels(monkeypatch)
    fit(SemanticPullbackCallback(num_images=1, class_names=["a", "b", "c", "d"], every_n_epochs=None), tmp_path,
        mock=False)
    assert drawn.probe(0)[1][1][0] in {"SP: a", "SP: b", "SP: c", "SP: d"}

    class Unnamed(BlobData):
        def __init__(self) -> None:
            super().__init__()
            del self.class_names

    drawn.pictures.clear()
    callback = SemanticPullbackCallback(num_images=1, every_n_epochs=None)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path))
    trainer.fit(TinyClassifier(), datamodule=Unnamed())
    assert drawn.probe(0)[1][1][0] == f"SP: class {int(callback.probe.labels[0])}"


def test_counterfactuals_are_clipped_to_the_valid_input_range(tmp_path) -> None:
    callback = SemanticPullbackCallback(num_images=4, every_n_epochs=None)
    trainer, _ = fit(callback, tmp_path, mock=False)
    low, high = callback._settings.bounds
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
    ascend = explain_module.PullbackAscent.ascend

    def spy(self: PullbackAscent, *args: Any, **kwargs: Any) -> Any:
        given.append(kwargs.get("first"))
        return ascend(self, *args, **kwargs)

    monkeypatch.setattr(explain_module.PullbackAscent, "ascend", spy)
    result = callback.explain(model, probe.images, probe.labels)
    assert given[0] is not None and given[0].shape[1] == 2  # the first step came from the Soft Pullback
    fresh = PullbackAscent(model, callback._settings.alpha, callback.ascent_steps, clip="every", bounds=callback._settings.bounds)
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
    low, high = callback._settings.bounds
    assert torch.equal(low, images.amin(dim=(0, 2, 3))) and torch.equal(high, images.amax(dim=(0, 2, 3)))
    assert torch.equal(callback.probe.images, images)  # the user's images, all of them


def test_user_mean_std_and_images_from_a_file(tmp_path, monkeypatch) -> None:
    images, labels = blob_images(3)
    path = tmp_path / "probe.pt"
    torch.save({"images": images, "labels": labels}, path)
    drawn = record_panels(monkeypatch)
    callback = SemanticPullbackCallback(images=str(path), mean=[0.0, 0.0, 0.0], std=[2.0, 2.0, 2.0],
                                        every_n_epochs=None, counterfactual=False, gradient=False)
    fit(callback, tmp_path, mock=False)
    assert torch.equal(callback.probe.labels, labels)
    assert torch.allclose(drawn.frames[0].images, (images * 2.0).clamp(0, 1))
    assert drawn.frames[0].explanations.counterfactuals is None
    assert len(drawn.probe(0)[1]) == 5  # input and 4 SP tiles: no gradient tile, no counterfactuals


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
    assert callback.probe is None  # fit start decides whether the saved set is used (see resumed_probe)
    saved = callback.state_dict()  # a checkpoint written before that still holds it
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
    merged = explain_module.merge_shards(shards, world_size)
    expected = _explanations(index)
    for name in ("probabilities", "targets", "soft_maps", "counterfactuals", "metric_scores"):
        assert torch.equal(getattr(merged, name), getattr(expected, name)), name
    assert merged.gradient_maps is None and merged.cosine is None


def test_correlation_of_maps() -> None:
    maps = torch.randn(3, 5, 5)
    constant = torch.ones(3, 5, 5)
    assert torch.allclose(explain_module.correlation(maps, maps), torch.ones(3))
    assert torch.allclose(explain_module.correlation(maps, -2 * maps + 1), -torch.ones(3))
    assert torch.equal(explain_module.correlation(maps, constant), torch.zeros(3))


def test_probe_images_are_found_with_validation_switched_off(tmp_path) -> None:
    callback = SemanticPullbackCallback(num_images=2)
    fit(callback, tmp_path, limit_val_batches=0)
    assert callback.probe is not None and len(callback.probe.images) == 2


def test_resuming_with_new_probe_images_uses_them_and_says_the_timelapse_restarts(tmp_path) -> None:
    first = SemanticPullbackCallback(num_images=4)
    checkpoint = ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    fit(first, tmp_path, callbacks_extra=[checkpoint], enable_checkpointing=True)
    last = str(tmp_path / "ckpt" / "last.ckpt")
    images, labels = blob_images(3, seed=5)
    expected = {"images=... given differ": images, "num_images=2 differs from the 4 images": first.probe.images[:2]}
    for callback, change in (
        (SemanticPullbackCallback(images=images, labels=labels), "images=... given differ"),
        (SemanticPullbackCallback(num_images=2), "num_images=2 differs from the 4 images"),
    ):
        with pytest.warns(UserWarning, match=f"{re.escape(change)}.*time-lapse and the drift correlation start again"):
            fit(callback, tmp_path, max_epochs=2, ckpt_path=last)
        assert torch.equal(callback.probe.images, expected[change])  # num_images=2, seed 0: the first two picks
    same = SemanticPullbackCallback(images=first.probe.images, labels=first.probe.labels)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(same, tmp_path, max_epochs=2, ckpt_path=last)  # the saved images again: nothing to say
    assert not [w for w in caught if "start again" in str(w.message)]


def test_a_diverged_model_is_drawn_with_flagged_tiles_and_a_warning(tmp_path) -> None:
    callback = SemanticPullbackCallback(num_images=2, every_n_epochs=None, on_error="raise")
    model = TinyClassifier()
    with torch.no_grad():
        model.model.head.weight.fill_(float("nan"))
    logger = TensorBoardLogger(str(tmp_path))
    with pytest.warns(UserWarning, match="probabilities and soft_maps hold NaN or infinite values"):
        pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, limit_train_batches=1, logger=logger)).fit(
            model, datamodule=BlobData()
        )
    assert "semantic_pullback/overview" in events(logger.log_dir).Tags()["images"]
