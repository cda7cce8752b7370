"""Every example runs at a tiny budget (CIFAR-10 from files the test writes) and logs Semantic Pullbacks."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
from _examples_support import assert_pullbacks_logged
from fake_datasets import write_cifar10
from lightning.pytorch import Trainer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_trained_and_tested(trainer: Trainer, steps: int, probe_images: int) -> None:
    assert trainer.state.finished and trainer.global_step == steps  # trained (then tested)
    assert 0.0 <= float(trainer.callback_metrics["test/acc"]) <= 1.0
    # the callback explained its probe images before training (step 0) and after the one epoch
    assert_pullbacks_logged(trainer.logger.log_dir, steps=[0, steps], num_images=probe_images)


def test_shapes_example(tmp_path: Path) -> None:
    trainer = _load("shapes").main(["--tiny", "--logdir", str(tmp_path)])
    _assert_trained_and_tested(trainer, steps=1, probe_images=6)  # 32 images, batches of 32; one per shape


def test_cifar10_resnet_example(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "data", per_batch=8)
    argv = ["--tiny", "--data-dir", str(tmp_path / "data"), "--val-size", "8", "--probe-images", "2"]
    argv += ["--logdir", str(tmp_path / "runs")]
    trainer = _load("cifar10_resnet").main(argv)
    _assert_trained_and_tested(trainer, steps=2, probe_images=2)
    assert trainer.lightning_module.hparams.backbone == "torchvision:resnet18"


@pytest.mark.parametrize("arch", ["vit", "pvt"])
def test_timm_transformer_example(arch: str, tmp_path: Path) -> None:
    trainer = _load("timm_vit").main(["--tiny", "--arch", arch, "--probe-images", "2", "--logdir", str(tmp_path)])
    _assert_trained_and_tested(trainer, steps=2, probe_images=2)
    assert trainer.lightning_module.hparams.backbone.startswith("timm:")


def test_examples_are_all_tested() -> None:
    tested = {"shapes", "cifar10_resnet", "timm_vit"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} <= tested | _tested_elsewhere()


def _tested_elsewhere() -> set[str]:
    """Examples other test files run (they name the example's file in their source)."""
    here = Path(__file__).name
    sources = [p.read_text() for p in Path(__file__).parent.glob("test_*.py") if p.name != here]
    return {p.stem for p in EXAMPLES.glob("*.py") if any(f"{p.stem}.py" in s or f'"{p.stem}"' in s for s in sources)}
