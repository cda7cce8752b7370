"""The sp-lightning command: configs, class selection from YAML, and every recipe in callbacks/."""

from __future__ import annotations

import importlib
import inspect
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor

import sp_lightning.tensorboard_server as server
from sp_lightning import SemanticPullbackCallback
from sp_lightning.cli import main, run_cli
from sp_lightning.data import CIFAR10DataModule, ShapesDataModule
from sp_lightning.models import ImageClassifier

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# fsdp.yaml needs a model that shards itself and 2 processes: test_fsdp_strategies.py runs it with the other FSDP checks
RECIPES = sorted(r for r in (ROOT / "callbacks").glob("*.yaml") if r.stem != "fsdp")
# Recipes pick the hardware (e.g. all GPUs); the test runs them on this machine's CPU.
OVERRIDDEN = {("trainer", "accelerator"), ("trainer", "devices")}


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads ``args``, not pytest's own command line."""
    monkeypatch.setattr(sys, "argv", ["sp-lightning"])


def test_console_script_points_at_the_cli() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["sp-lightning"].partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_defaults_are_the_shapes_demo_with_linked_class_count() -> None:
    cli = run_cli(["--data.init_args.train_size=8"], run=False)
    assert type(cli.datamodule) is ShapesDataModule and type(cli.model) is ImageClassifier
    assert cli.model.hparams.backbone == "small_cnn"
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes == 6


def test_model_and_data_are_selected_from_yaml_class_paths(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"class_path": "sp_lightning.models.ImageClassifier", "init_args": {"lr": 0.02}},
                "data": {"class_path": "CIFAR10DataModule", "init_args": {"data_dir": str(tmp_path)}},
            }
        )
    )
    cli = run_cli(["--config", str(config)], run=False)
    assert isinstance(cli.datamodule, CIFAR10DataModule) and cli.datamodule.data_dir == tmp_path
    assert cli.model.hparams.num_classes == 10 and cli.model.hparams.lr == 0.02
    subset = run_cli(["--data.init_args.classes=[disc, ring]"], run=False)
    assert subset.model.hparams.num_classes == 2


def test_callbacks_are_selected_from_yaml(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    callback = {"class_path": "LearningRateMonitor", "init_args": {"logging_interval": "step"}}
    recipe.write_text(yaml.safe_dump({"trainer": {"callbacks": [callback]}}))
    cli = run_cli(["--config", str(TINY), "--config", str(recipe)], run=False)
    monitors = [cb for cb in cli.trainer.callbacks if isinstance(cb, LearningRateMonitor)]
    assert len(monitors) == 1 and monitors[0].logging_interval == "step"


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_builds(config: Path) -> None:
    cli = run_cli(["--config", str(config)], run=False)
    assert cli.model.hparams.num_classes == cli.datamodule.num_classes
    declared = yaml.safe_load(config.read_text())
    _assert_contains(yaml.safe_load(cli.parser.dump(cli.config)), declared, ())


def _assert_contains(saved: Any, wanted: Any, path: tuple[str, ...]) -> None:
    """Every setting in ``wanted`` (a recipe or config) is in effect in ``saved`` (the run's full config)."""
    if path in OVERRIDDEN:
        return
    where = ".".join(path) or "<root>"
    if isinstance(wanted, dict):
        assert isinstance(saved, dict), f"{where}: expected a mapping, got {saved!r}"
        for key, value in wanted.items():
            assert key in saved, f"{where}.{key} is missing from the effective config"
            _assert_contains(saved[key], value, (*path, key))
    elif isinstance(wanted, list):
        assert isinstance(saved, list) and len(saved) >= len(wanted), f"{where}: expected {wanted!r}, got {saved!r}"
        for item in wanted:
            assert any(_matches(s, item, path) for s in saved), f"{where}: {item!r} is not in effect"
    elif path and path[-1] == "class_path":
        assert saved == wanted or str(saved).endswith(f".{wanted}"), f"{where}: {saved!r} is not {wanted!r}"
    else:
        assert saved == wanted, f"{where}: {saved!r} != {wanted!r}"


def _matches(saved: Any, wanted: Any, path: tuple[str, ...]) -> bool:
    try:
        _assert_contains(saved, wanted, path)
    except AssertionError:
        return False
    return True


def test_recipes_exist() -> None:
    assert any(r.stem == "ddp" for r in RECIPES)


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_recipe_runs_at_a_tiny_budget(recipe: Path, tmp_path: Path) -> None:
    settings = yaml.safe_load(recipe.read_text()) or {}
    ddp = "ddp" in str(settings.get("trainer", {}).get("strategy", ""))
    devices = 2 if ddp else 1
    args = [
        "fit",
        "--config", str(TINY),
        "--config", str(recipe),
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.accelerator=cpu",
        f"--trainer.devices={devices}",
    ]  # fmt: skip
    if ddp:  # DDP re-launches the command, so it runs as its own process (gloo on CPU)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(
            [sys.executable, "-m", "sp_lightning.cli", *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-4000:]
    else:
        run_cli(args)
    run_dir = tmp_path / "lightning_logs" / "version_0"
    effective = yaml.safe_load((run_dir / "config.yaml").read_text())
    _assert_contains(effective, settings, ())
    assert int(effective["trainer"]["devices"]) == devices
    checkpoint = torch.load(next((run_dir / "checkpoints").glob("*.ckpt")), map_location="cpu", weights_only=False)
    data = effective["data"]["init_args"]
    per_process = math.ceil(data["train_size"] / devices)
    assert checkpoint["global_step"] == math.ceil(per_process / data["batch_size"]) * effective["trainer"]["max_epochs"]


def test_help_describes_every_callback_argument() -> None:
    """``--trainer.callbacks.help SemanticPullbackCallback`` shows each argument's description from the docstring."""
    result = subprocess.run(
        [sys.executable, "-m", "sp_lightning.cli", "fit", "--trainer.callbacks.help", "SemanticPullbackCallback"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    for name in inspect.signature(SemanticPullbackCallback).parameters:
        line = next((ln for ln in result.stdout.splitlines() if ln.strip().startswith(f"--trainer.callbacks.{name} ")), None)
        assert line is not None, name
    assert "how many probe images to take from the validation dataloader" in " ".join(result.stdout.split())
    assert "keep an animated time-lapse file per probe image" in " ".join(result.stdout.split())


def test_tensorboard_subcommand_keeps_every_image(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(server.subprocess, "call", lambda command: calls.append(command) or 0)
    with pytest.raises(SystemExit) as exit_info:
        main(["tensorboard", "runs/x", "--port", "6007"])
    assert exit_info.value.code == 0
    assert calls == [[sys.executable, "-m", "tensorboard.main", "--logdir", "runs/x",
                      "--samples_per_plugin", "images=100000", "--port", "6007"]]
    with pytest.raises(SystemExit) as exit_info:
        main(["tensorboard"])
    assert exit_info.value.code == 2 and "usage: sp-lightning tensorboard LOGDIR" in capsys.readouterr().err
