"""Which module and which weights an explanation runs: FSDP1's root wrapper, compiled submodules
eagerly, and the live (not the averaged) weights under Lightning's weight averaging; DeepSpeed refused
by soft training; the SLURM FSDP2 job's command line."""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback, EMAWeightAveraging
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn

from callback_support import BlobData, TinyClassifier, blob_images, one_thread, trainer_kwargs  # noqa: F401
from sp_lightning import SemanticPullbackCallback, SoftBackwardTraining
from sp_lightning.engine import SoftRules
from sp_lightning.probe import Explanations
from sp_lightning.probe.explain import ExplainSettings, explain_probe

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:No logger of this run shows images"),
]


def test_fsdp1_explains_through_the_root_wrapper() -> None:
    """FSDP1's root wrapper must run every forward (Lightning's FSDPStrategy needs a GPU: a stand-in wrapper here)."""
    module, wrapper = TinyClassifier(), nn.Identity()
    strategy = FSDPStrategy()
    strategy.model = wrapper
    module._trainer = SimpleNamespace(strategy=strategy)
    assert SemanticPullbackCallback()._model(module) is wrapper
    with pytest.raises(ValueError, match="model_attr cannot be used with FSDPStrategy"):
        SemanticPullbackCallback(model_attr="model")._model(module)


def test_soft_training_refuses_deepspeed() -> None:
    from lightning.pytorch.strategies import DeepSpeedStrategy

    trainer = SimpleNamespace(strategy=DeepSpeedStrategy.__new__(DeepSpeedStrategy))  # __init__ needs deepspeed
    with pytest.raises(RuntimeError, match="SoftBackwardTraining does not support DeepSpeedStrategy"):
        SoftBackwardTraining().setup(trainer, TinyClassifier(), "fit")


def _settings() -> ExplainSettings:
    bounds = (torch.full((3,), -3.0), torch.full((3,), 3.0))
    return ExplainSettings(
        top_k=1, gradient=True, counterfactual=True, ascent_steps=2, alpha=0.05, bounds=bounds,
        rules=SoftRules.create({"relu": 0.3}), logits_fn=None, reduction="mean", metrics=(), seed=0,
    )


def test_compiled_submodules_are_explained_eagerly_through_their_original_modules() -> None:
    torch.manual_seed(0)
    plain = TinyClassifier().eval()
    compiled = TinyClassifier().eval()
    compiled.load_state_dict(plain.state_dict())
    compiled.model.features = torch.compile(compiled.model.features, backend="eager")  # as configure_model would
    compiled.model.head.compile(backend="eager")  # and in place
    calls: list[int] = []
    compiled.model.features.register_forward_pre_hook(lambda *args: calls.append(1))
    head_impl = compiled.model.head._compiled_call_impl
    images, labels = blob_images(2)

    ours = explain_probe(compiled, images, labels, _settings())
    reference = explain_probe(plain, images, labels, _settings())
    assert calls == []  # the compiled wrapper never ran
    assert type(compiled.model.features).__name__ == "OptimizedModule"  # and all is put back
    assert compiled.model.head._compiled_call_impl is head_impl
    for name in ("probabilities", "soft_maps", "gradient_maps", "counterfactuals"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name), msg=name)
    assert SemanticPullbackCallback(model_attr="model")._model(
        SimpleNamespace(model=torch.compile(plain.model, backend="eager"))
    ) is plain.model


class LiveWeights(Callback):
    """Snapshots the weights the optimizer updates, at the end of every training batch."""

    def __init__(self) -> None:
        self.live: list[Tensor] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.live = [p.detach().clone() for p in pl_module.parameters()]


class Recording(SemanticPullbackCallback):
    """Records, at every log, whether the explained weights are the live ones and whether they are the average's."""

    def __init__(self, live: LiveWeights, ema: EMAWeightAveraging, **options: Any) -> None:
        super().__init__(**options)
        self.live_weights, self.ema = live, ema
        self.seen: list[tuple[bool, bool]] = []

    def explain(self, model: nn.Module, images: Tensor, labels: Tensor | None) -> Explanations:
        explained = [p.detach() for p in model.parameters()]
        average = list(self.ema._average_model.module.parameters())
        self.seen.append((
            all(torch.equal(a, b) for a, b in zip(explained, self.live_weights.live)),
            all(torch.equal(a, b) for a, b in zip(explained, average)),
        ))
        return super().explain(model, images, labels)


def test_weight_averaging_explains_the_live_weights(tmp_path: Any) -> None:
    live, ema = LiveWeights(), EMAWeightAveraging(decay=0.5)
    callback = Recording(live, ema, num_images=2, every_n_steps=1, log_at_fit_start=False, counterfactual=False)
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, max_epochs=2, callbacks=[live, ema, callback]))
    trainer.fit(TinyClassifier(), datamodule=BlobData(train=32, val=16, batch_size=16))
    # a log after every step (the epoch-end logs fall on the same steps); validation swapped the average in and out
    assert len(callback.seen) == 4
    assert all(is_live for is_live, _ in callback.seen)
    assert not any(is_average for _, is_average in callback.seen[1:])  # the first update copies the live weights


def test_the_slurm_fsdp_job_parses(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``fsdp.sbatch``'s command, with 2 nodes of 4 tasks, gives FSDP2 over all 8 processes (parsed, not run)."""
    root = Path(__file__).resolve().parents[1]
    script = root / "examples" / "slurm" / "fsdp.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    command = script.read_text().split("srun python examples/slurm/train.py", 1)[1].replace("\\\n", " ")
    values = {"${SLURM_NNODES}": "2", "${SLURM_NTASKS_PER_NODE}": "4", "${WORLD_SIZE}": "8"}
    for name, value in values.items():
        command = command.replace(name, value)
    args = [arg.replace("examples/", f"{root}/examples/").replace("callbacks/", f"{root}/callbacks/")
            for arg in shlex.split(command)]
    spec = importlib.util.spec_from_file_location("slurm_train", root / "examples" / "slurm" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit):
        train.main([*args, "--print_config"])
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["strategy"]["class_path"].endswith("ModelParallelStrategy")
    assert trainer["strategy"]["init_args"]["data_parallel_size"] == 8
    assert trainer["strategy"]["init_args"]["tensor_parallel_size"] == 1
    assert (int(trainer["num_nodes"]), int(trainer["devices"])) == (2, 4)
