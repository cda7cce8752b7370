"""The LightningCLI recipe ``callbacks/semantic_pullback.yaml`` loads and runs; every argument is YAML-expressible."""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callback_support import BlobData, TinyClassifier, first_output, one_thread, swapped_batch  # noqa: F401
from sp_lightning import SemanticPullbackCallback

pytestmark = pytest.mark.usefixtures("one_thread", "plain_argv")


@pytest.fixture
def plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when pytest's own command line is present besides ``args``."""
    monkeypatch.setattr(sys, "argv", ["cli"])

RECIPE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "callbacks", "semantic_pullback.yaml")


def cli(tmp_path: Any, config: str) -> LightningCLI:
    return LightningCLI(
        TinyClassifier,
        BlobData,
        run=False,
        save_config_kwargs={"overwrite": True},
        args=[
            "--config", config,
            "--seed_everything=0",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.accelerator=cpu",
        ],
    )


def the_callback(cli: LightningCLI) -> SemanticPullbackCallback:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, SemanticPullbackCallback)]
    return callback


def test_recipe_lists_every_argument_with_its_default() -> None:
    with open(RECIPE) as handle:
        (entry,) = yaml.safe_load(handle)["trainer"]["callbacks"]
    assert entry["class_path"] == "sp_lightning.SemanticPullbackCallback"
    parameters = inspect.signature(SemanticPullbackCallback).parameters
    assert set(entry["init_args"]) == set(parameters)
    for name, value in entry["init_args"].items():
        assert value == parameters[name].default, name


def test_recipe_loads_and_runs(tmp_path) -> None:
    app = cli(tmp_path, RECIPE)
    callback = the_callback(app)
    assert (callback.num_images, callback.every_n_epochs, callback.top_k) == (8, 1, 3)
    app.trainer.fit(app.model, datamodule=app.datamodule)
    events = EventAccumulator(app.trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("semantic_pullback/overview")] == [0, 2]
    assert len(events.Tags()["images"]) == 9


def test_every_argument_can_be_set_from_yaml(tmp_path) -> None:
    images = torch.rand(4, 3, 16, 16)
    torch.save({"images": images, "labels": torch.tensor([0, 1, 2, 3])}, tmp_path / "probe.pt")
    with open(RECIPE) as handle:
        config = yaml.safe_load(handle)
    config["trainer"]["callbacks"][0]["init_args"].update(
        images=str(tmp_path / "probe.pt"),
        batch_fn="callback_support.swapped_batch",
        logits_fn="callback_support.first_output",
        every_n_steps=1,
        temperatures={"relu": 0.5, "maxpool": None},
        ascent_alpha=0.5,
        color_scale=0.1,
        mean=[0.5, 0.5, 0.5],
        std=[0.5, 0.5, 0.5],
        input_bounds=[[-1.0, -1.0, -1.0], 1.0],
        class_names=["n", "e", "s", "w"],
        reduction="l2",
        tag="sp",
        on_error="raise",
    )
    path = tmp_path / "custom.yaml"
    path.write_text(yaml.safe_dump(config))
    app = cli(tmp_path, str(path))
    callback = the_callback(app)
    assert callback.batch_fn is swapped_batch and callback.logits_fn is first_output
    assert callback.rules.tau("relu") == 0.5 and callback.rules.tau("maxpool") is None
    assert callback.input_bounds == ([-1.0, -1.0, -1.0], 1.0)
    app.trainer.fit(app.model, datamodule=app.datamodule)
    assert torch.equal(callback.probe.images, images)
    events = EventAccumulator(app.trainer.logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("sp/overview")] == [0, 1, 2]
