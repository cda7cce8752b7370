"""TensorBoard is the product's screen: a real ``tensorboard`` server serves the callback's images and scalars.

One tiny real fit with ``SemanticPullbackCallback`` writes a log directory; the
``tensorboard`` command runs on it on localhost, and everything below is read
through TensorBoard's HTTP data API (what its web page reads), compared with
what the event files hold. Last, the README's screenshots (made by
``docs/screenshot.py`` from TensorBoard in headless Chromium) must exist.
"""

from __future__ import annotations

import io
import math
import os
import re
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from callback_support import BlobData, TinyClassifier, trainer_kwargs
from sp_lightning import SemanticPullbackCallback
from sp_lightning.tensorboard_server import fetch, fetch_json, serve_tensorboard, wait_until

PROBES = 2
EPOCHS = 2
IMAGE_TAGS = {"semantic_pullback/overview"} | {f"semantic_pullback/probe_{i:02d}" for i in range(PROBES)}
SCALAR_TAGS = {
    f"semantic_pullback/{name}"
    for name in ("seconds", "cosine_gradient_sp", "drift_correlation", "counterfactual_logit_gain",
                 "counterfactual_probability_gain", "counterfactual_logit_gain_runner_up",
                 "counterfactual_probability_gain_runner_up", "metrics/random_logit")
}
LOAD_TIMEOUT = 60.0


@dataclass
class Served:
    """A running TensorBoard on the tiny run, and what the run logged (read from its event file)."""

    url: str
    run: str
    steps: list[int]  # the callback's schedule: fit start, then every epoch end
    events: EventAccumulator


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    logdir = tmp_path_factory.mktemp("tensorboard_logs")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is faster on a shared machine
    try:
        callback = SemanticPullbackCallback(num_images=PROBES, metrics=["random_logit"])
        trainer = pl.Trainer(
            callbacks=[callback],
            **trainer_kwargs(logdir, max_epochs=EPOCHS, logger=TensorBoardLogger(str(logdir), name="tiny")),
        )
        trainer.fit(TinyClassifier(), datamodule=BlobData())
    finally:
        torch.set_num_threads(threads)
    steps = [epoch * trainer.num_training_batches for epoch in range(EPOCHS + 1)]
    events = EventAccumulator(trainer.logger.log_dir, size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    run = os.path.relpath(trainer.logger.log_dir, logdir).replace(os.sep, "/")
    with serve_tensorboard(str(logdir)) as url:
        yield Served(url, run, steps, events)


def image_tags(served: Served) -> dict:
    return fetch_json(served.url, "data/plugin/images/tags").get(served.run, {})


def scalar_tags(served: Served) -> dict:
    return fetch_json(served.url, "data/plugin/scalars/tags").get(served.run, {})


def test_run_and_dashboards_are_served(served: Served) -> None:
    wait_until(lambda: fetch_json(served.url, "data/runs"), lambda runs: served.run in runs, LOAD_TIMEOUT,
               f"the run {served.run!r}")
    listing = fetch_json(served.url, "data/plugins_listing")
    assert listing["images"]["enabled"] and listing["scalars"]["enabled"]


def test_every_image_tag_is_served_with_one_image_per_logged_step(served: Served) -> None:
    tags = wait_until(lambda: image_tags(served), lambda t: IMAGE_TAGS <= set(t), LOAD_TIMEOUT, "the image tags")
    assert set(tags) == IMAGE_TAGS
    for tag in IMAGE_TAGS:
        assert tags[tag]["samples"] == 1  # one picture per step, not a batch
        images = wait_until(
            lambda: fetch_json(served.url, "data/plugin/images/images", run=served.run, tag=tag),
            lambda listed: len(listed) >= len(served.steps), LOAD_TIMEOUT, f"every step of {tag}",
        )
        assert [image["step"] for image in images] == served.steps, tag


def test_served_images_are_the_logged_pngs(served: Served) -> None:
    wait_until(lambda: image_tags(served), lambda t: IMAGE_TAGS <= set(t), LOAD_TIMEOUT, "the image tags")
    for tag in sorted(IMAGE_TAGS):
        listed = fetch_json(served.url, "data/plugin/images/images", run=served.run, tag=tag)
        logged = {event.step: event for event in served.events.Images(tag)}
        assert {image["step"] for image in listed} == set(logged), tag
        for image in listed:
            body = fetch(served.url, "data/plugin/images/individualImage?" + image["query"])
            event = logged[image["step"]]
            assert body == event.encoded_image_string, (tag, image["step"])
            picture = Image.open(io.BytesIO(body))
            picture.load()  # decodes every pixel
            assert (picture.format, picture.mode) == ("PNG", "RGB"), (tag, image["step"])
            assert picture.size == (event.width, event.height), (tag, image["step"])
            assert min(picture.size) >= 128  # the callback's min_image_size
            assert any(low < high for low, high in picture.getextrema()), f"{tag} at step {image['step']} is blank"


def test_every_scalar_is_served_at_the_logged_steps(served: Served) -> None:
    tags = wait_until(lambda: scalar_tags(served), lambda t: SCALAR_TAGS <= set(t), LOAD_TIMEOUT, "the scalar tags")
    assert {tag for tag in tags if tag.startswith("semantic_pullback/")} == SCALAR_TAGS
    for tag in sorted(SCALAR_TAGS):
        served_points = fetch_json(served.url, "data/plugin/scalars/scalars", run=served.run, tag=tag)
        expected = served.steps[1:] if tag.endswith("drift_correlation") else served.steps  # drift needs a previous log
        assert [step for _, step, _ in served_points] == expected, tag
        logged = [event.value for event in served.events.Scalars(tag)]
        assert all(math.isfinite(value) for _, _, value in served_points), tag
        assert [value for _, _, value in served_points] == pytest.approx(logged, rel=1e-6), tag


def test_server_stops_on_exit_and_a_failed_start_shows_its_output(tmp_path) -> None:
    with serve_tensorboard(str(tmp_path)) as url:
        assert fetch_json(url, "data/runs") == []  # nothing logged there
    with pytest.raises(urllib.error.URLError):
        fetch(url, "data/runs", timeout=5)
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 2\..*unrecognized arguments: --no_such_flag"):
        with serve_tensorboard(str(tmp_path), extra_args=["--no_such_flag"]):
            pass


def test_readme_screenshots_exist_as_pngs() -> None:
    root = Path(__file__).resolve().parents[1]
    shown = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (root / "README.md").read_text())
    assert "docs/tensorboard.png" in shown
    for path in shown:
        with Image.open(root / path) as picture:
            picture.load()
            assert picture.format == "PNG" and min(picture.size) > 0, path
