"""``sp-lightning explain``: the callback's pictures and scalars for the checkpoints of a finished run."""

from __future__ import annotations

import glob
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sp_lightning import SemanticPullbackCallback
from sp_lightning.cli import main, run_cli
from sp_lightning.data import ShapesDataModule
from sp_lightning.replay import ExplainError, build_parser, explain_checkpoints

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
EVERY_EPOCH = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_top_k": -1}}
CALLBACK = {  # cheap settings; the replay of the run trained with it takes them from its config
    "class_path": "sp_lightning.SemanticPullbackCallback",
    "init_args": {"num_images": 4, "top_k": 2, "ascent_steps": 2, "background": False, "log_at_fit_start": False},
}


class NoValidationShapes(ShapesDataModule):
    """Shapes without a validation split (for the error test; the config names it by import path)."""

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        self.val_set = None


def _fit(root: Path, callbacks: list[dict[str, Any]], logger: Any) -> Path:
    config = root / "extra.yaml"  # Lightning saves the whole config as config.yaml
    config.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks, "logger": logger}}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["sp-lightning"])
        run_cli(["fit", "--config", str(TINY), "--config", str(config), f"--trainer.default_root_dir={root}"])
    return config


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shapes run, two epochs, a checkpoint after each, trained without the callback."""
    root = tmp_path_factory.mktemp("plain")
    _fit(root, [EVERY_EPOCH], False)
    return root / "checkpoints"


@pytest.fixture(scope="module")
def callback_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same run trained with the callback logging to TensorBoard: (its config, its log directory)."""
    root = tmp_path_factory.mktemp("with_callback")
    logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": str(root)}}
    config = _fit(root, [EVERY_EPOCH, CALLBACK], logger)
    return config, root / "lightning_logs" / "version_0"


def explain(*args: str) -> None:
    with pytest.raises(SystemExit) as done:
        main(["explain", *args])
    assert done.value.code == 0


def events(directory: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(directory), size_guidance={"images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def steps_of(checkpoints: Path) -> list[int]:
    return sorted(torch.load(path, weights_only=False)["global_step"] for path in checkpoints.glob("*.ckpt"))


def test_a_run_without_the_callback_gets_its_panels_scalars_and_timelapse(plain_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "explained"
    explain("--config", str(TINY), "--ckpt_path", str(plain_run / "*.ckpt"), "--out", str(out),
            "--callback.num_images", "4", "--callback.ascent_steps", "2", "--callback.png_dir", str(out / "png"))
    steps = steps_of(plain_run)
    assert len(steps) == 2 and steps[0] < steps[1]
    found = events(out)
    probes = [f"semantic_pullback/probe_{i:02d}" for i in range(4)]
    assert sorted(found.Tags()["images"]) == sorted(["semantic_pullback/overview", *probes])
    for tag in found.Tags()["images"]:
        assert [event.step for event in found.Images(tag)] == steps
    scalars = {"cosine_gradient_sp", "drift_correlation", "seconds", "counterfactual_logit_gain",
               "counterfactual_probability_gain", "counterfactual_logit_gain_runner_up",
               "counterfactual_probability_gain_runner_up"}
    assert set(found.Tags()["scalars"]) == {f"semantic_pullback/{name}" for name in scalars}
    assert [event.step for event in found.Scalars("semantic_pullback/drift_correlation")] == steps[1:]
    assert [event.step for event in found.Scalars("semantic_pullback/cosine_gradient_sp")] == steps
    gifs = sorted(os.listdir(out / "semantic_pullback" / "timelapse"))
    assert gifs == sorted(["overview.gif"] + [f"probe_{i:02d}.gif" for i in range(4)])
    with Image.open(out / "semantic_pullback" / "timelapse" / "overview.gif") as gif:
        assert gif.n_frames == len(steps)
    png = out / "png" / "semantic_pullback" / "overview" / f"step_{steps[-1]:08d}.png"
    with Image.open(png) as picture:
        assert picture.width > 300 and picture.height > 200
    with pytest.raises(SystemExit) as again:  # a second replay into the same directory would double every step
        main(["explain", "--config", str(TINY), "--ckpt_path", str(plain_run / "*.ckpt"), "--out", str(out)])
    assert again.value.code == 2


def test_replay_of_a_run_with_the_callback_gives_its_scalars_at_its_steps(callback_run: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    _, log_dir = callback_run
    checkpoints = log_dir / "checkpoints"
    out = tmp_path / "explained"
    saved = log_dir / "config.yaml"  # what `fit` saved, with its own ckpt_path option in it
    assert "ckpt_path" in yaml.safe_load(saved.read_text())
    explain("--config", str(saved), "--ckpt_path", str(checkpoints / "*.ckpt"), "--out", str(out))
    trained, replayed = events(log_dir), events(out)
    assert [e.step for e in trained.Images("semantic_pullback/overview")] == steps_of(checkpoints)
    assert sorted(replayed.Tags()["images"]) == sorted(
        ["semantic_pullback/overview", *(f"semantic_pullback/probe_{i:02d}" for i in range(4))]
    )
    tags = [tag for tag in trained.Tags()["scalars"] if tag.startswith("semantic_pullback/")]
    assert sorted(replayed.Tags()["scalars"]) == sorted(tags) and len(tags) > 5
    for tag in tags:
        if tag.endswith("/seconds"):
            continue
        during = {e.step: e.value for e in trained.Scalars(tag)}
        after = {e.step: e.value for e in replayed.Scalars(tag)}
        assert after.keys() == during.keys(), tag
        for step, value in after.items():
            assert value == pytest.approx(during[step], rel=1e-4, abs=1e-6), (tag, step)


def test_probe_set_is_the_one_the_callback_picks(plain_run: Path, callback_run: tuple[Path, Path],
                                                 tmp_path: Path) -> None:
    """Same data and seed: the replay of a run trained without the callback explains the images the callback took."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["sp-lightning"])
        run = run_cli(["--config", str(TINY), "--trainer.logger=false"], run=False)
    first = sorted(glob.glob(str(plain_run / "*.ckpt")))[0]
    copy = tmp_path / "last.ckpt"  # as ModelCheckpoint(save_last=True) writes: the same step twice
    copy.write_bytes(Path(first).read_bytes())
    cheap = SemanticPullbackCallback(num_images=4, top_k=1, gradient=False, counterfactual=False, timelapse=False)
    step = steps_of(plain_run)[0]
    before = {key: value.clone() for key, value in run.model.state_dict().items()}
    with pytest.warns(UserWarning, match=rf"one checkpoint per global step is explained; skipping last.ckpt \(step {step}\)"):
        probe = explain_checkpoints(run.model, [first, str(copy)], str(tmp_path / "out"), cheap, run.datamodule,
                                    progress=False)
    assert [e.step for e in events(tmp_path / "out").Images("semantic_pullback/overview")] == [step]
    assert all(torch.equal(before[key], value) for key, value in run.model.state_dict().items())  # a copy explained
    saved = torch.load(next((callback_run[1] / "checkpoints").glob("*.ckpt")), weights_only=False)
    state = saved["callbacks"][SemanticPullbackCallback().state_key]
    assert torch.equal(probe.images, state["images"]) and torch.equal(probe.labels, state["labels"])


def test_images_file_and_callback_options_pass_through(plain_run: Path, tmp_path: Path) -> None:
    images = torch.rand(3, 3, 32, 32)
    torch.save({"images": images, "labels": torch.tensor([0, 4, 5])}, tmp_path / "probe.pt")
    out = tmp_path / "explained"
    explain("--config", str(TINY), "--ckpt_path", str(plain_run / "epoch=1*.ckpt"), "--out", str(out),
            "--images", str(tmp_path / "probe.pt"), "--callback.tag", "replayed", "--callback.counterfactual", "false",
            "--callback.metrics", "[random_logit]", "--callback.timelapse", "false", "--progress", "false")
    found = events(out)
    assert sorted(found.Tags()["images"]) == ["replayed/overview", "replayed/probe_00", "replayed/probe_01",
                                              "replayed/probe_02"]
    assert set(found.Tags()["scalars"]) == {"replayed/seconds", "replayed/cosine_gradient_sp",
                                            "replayed/metrics/random_logit"}
    assert not (out / "replayed").exists()


def test_clear_errors(plain_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def refused(*args: str) -> str:
        with pytest.raises(SystemExit) as done:
            main(["explain", "--out", str(tmp_path / "out"), *args])
        assert done.value.code == 2
        return " ".join(capsys.readouterr().err.split())

    message = refused("--config", str(TINY), "--ckpt_path", str(tmp_path / "nothing" / "*.ckpt"))
    assert "No checkpoint file matches" in message and "--ckpt_path" in message
    wider = tmp_path / "wider.yaml"
    wider.write_text(yaml.safe_dump({"model": {"init_args": {"backbone_kwargs": {"widths": [4, 8]}}}}))
    message = refused("--config", str(TINY), "--config", str(wider), "--ckpt_path", str(plain_run / "*.ckpt"))
    assert "is a checkpoint of another model than the config's ImageClassifier" in message
    assert "epoch=0-step=" in message and "other shapes" in message and "Pass the --config the run was trained" in message
    no_val = tmp_path / "no_val.yaml"
    no_val.write_text(yaml.safe_dump({"data": {"class_path": f"{__name__}.NoValidationShapes"}}))
    message = refused("--config", str(TINY), "--config", str(no_val), "--ckpt_path", str(plain_run / "*.ckpt"))
    assert "NoValidationShapes gives no validation data" in message and "--images PATH" in message
    message = refused("--config", str(TINY), "--ckpt_path", str(plain_run / "*.ckpt"), "--callback.top_k", "0")
    assert "top_k must be an integer >= 1" in message
    assert not glob.glob(str(tmp_path / "out" / "events*"))  # nothing was written before the errors


def test_help_describes_the_callback_options_and_leaves_out_the_schedule() -> None:
    text = " ".join(build_parser().format_help().split())
    assert "--callback.top_k" in text and "--ckpt_path" in text and "--images" in text
    assert "how many probe images to take from the validation dataloader" in text
    assert "--callback.every_n_epochs" not in text and "--callback.images" not in text


def test_python_api_errors_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "not_a_checkpoint.ckpt"
    torch.save({"weights": torch.zeros(1)}, broken)
    with pytest.raises(ExplainError, match="not_a_checkpoint.ckpt is not a Lightning checkpoint"):
        explain_checkpoints(torch.nn.Linear(1, 1), [str(broken)], str(tmp_path), SemanticPullbackCallback())
