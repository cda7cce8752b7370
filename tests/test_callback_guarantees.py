"""The callback's guarantees: training untouched, inference mode, errors, memory, precision, fit-start checks."""

from __future__ import annotations

import gc
import warnings
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from callback_support import (  # noqa: F401  (one_thread is a fixture)
    BlobData,
    TinyClassifier,
    blob_images,
    one_thread,
    trainer_kwargs,
)
from sp_lightning import SemanticPullbackCallback, SoftPullback
from sp_lightning.callbacks.writer import PanelWriter
from sp_lightning.probe import Explanations
from sp_lightning.sinks import ImageSink
from sp_lightning.probe import METRICS
from sp_lightning.probe import reduce_channels

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:No logger of this run shows images"),
]


class Flaky(TinyClassifier):
    """Fails in the explanation's first graph-building eval forward when ``fail`` is set; counts training steps."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail, self.steps = fail, 0

    def forward(self, x: Tensor) -> Tensor:
        if self.fail and torch.is_grad_enabled() and not self.training:
            raise RuntimeError("explode")
        return super().forward(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.steps += 1
        return super().training_step(batch, batch_idx)


def train(tmp_path: Any, callbacks: list[Callback], fail: bool = False) -> tuple[Flaky, pl.Trainer]:
    pl.seed_everything(7, verbose=False)
    model = Flaky(fail)
    trainer = pl.Trainer(
        callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=3, deterministic=True, num_sanity_val_steps=2)
    )
    trainer.fit(model, datamodule=BlobData())
    return model, trainer


def test_training_is_bit_identical_with_and_without_the_callback(tmp_path) -> None:
    reference, ref_trainer = train(tmp_path / "plain", [])
    watched, trainer = train(
        tmp_path / "watched",
        [
            SemanticPullbackCallback(),
            SemanticPullbackCallback(num_images=2, every_n_steps=1, tag="often", metrics=list(METRICS)),
        ],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        failing, _ = train(tmp_path / "failing", [SemanticPullbackCallback(num_images=2)], fail=True)
    (run,) = (tmp_path / "watched" / "semantic_pullback_logs").iterdir()  # no logger: one fresh run directory
    assert len(list((run / "often" / "probe_00").iterdir())) == 13  # step 0 and steps 1..12
    for model in (watched, failing):
        state, ref_state = model.state_dict(), reference.state_dict()  # weights and BatchNorm statistics
        assert state.keys() == ref_state.keys()
        assert all(torch.equal(state[k], ref_state[k]) for k in state)
        for p, q in zip(model.parameters(), reference.parameters()):
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
        assert [m.training for m in model.modules()] == [m.training for m in reference.modules()]
    momentum = [s["momentum_buffer"] for s in trainer.optimizers[0].state.values()]
    ref_momentum = [s["momentum_buffer"] for s in ref_trainer.optimizers[0].state.values()]
    assert len(momentum) == len(ref_momentum) > 0 and all(map(torch.equal, momentum, ref_momentum))
    failures = [str(w.message) for w in caught if "SemanticPullbackCallback failed" in str(w.message)]
    assert len(failures) == 4  # baseline and three epoch ends, each reported, training went on
    assert "failed at step 0: RuntimeError: explode" in failures[0] and "Training continues" in failures[0]


class Recorder(Callback):
    """Puts one submodule in eval mode before training starts and records every module's flag."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.model.features[1].eval()
        self.modes = [m.training for m in pl_module.modules()]


def test_errors_can_stop_training_and_leave_the_model_restored(tmp_path) -> None:
    recorder = Recorder()
    model = Flaky(fail=True)
    trainer = pl.Trainer(callbacks=[recorder, SemanticPullbackCallback(num_images=2, on_error="raise")],
                         **trainer_kwargs(tmp_path))
    with pytest.raises(RuntimeError, match=r"failed at step 0: RuntimeError: explode .*on_error='warn'"):
        trainer.fit(model, datamodule=BlobData())
    assert [m.training for m in model.modules()] == recorder.modes
    assert False in recorder.modes and True in recorder.modes
    assert all(p.grad is None for p in model.parameters())
    assert model.steps == 0


def fitted(tmp_path: Any, **options: Any) -> tuple[SemanticPullbackCallback, pl.Trainer]:
    """A callback set up by a one-step fit (baseline log only)."""
    callback = SemanticPullbackCallback(every_n_epochs=None, **options)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, limit_train_batches=1))
    trainer.fit(TinyClassifier(), datamodule=BlobData())
    return callback, trainer


def assert_same(a: Explanations, b: Explanations) -> None:
    for name in vars(a):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or torch.equal(x, y), name


def test_explanations_work_under_inference_mode(tmp_path) -> None:
    callback, trainer = fitted(tmp_path, num_images=3)
    model = trainer.lightning_module
    reference = callback.explain(model, callback.probe.images, callback.probe.labels)
    with torch.inference_mode():
        images, labels = callback.probe.images.clone(), callback.probe.labels.clone()  # inference tensors
        assert images.is_inference()
        result = callback.explain(model, images, labels)
    assert_same(result, reference)
    assert result.soft_maps.abs().sum() > 0 and result.counterfactuals is not None


class FromValidation(SemanticPullbackCallback):
    """Logs from ``trainer.validate``'s epoch-end hook, which Lightning runs under ``torch.inference_mode``."""

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":  # not the validation inside fit (which runs under no_grad)
            self.inference_mode = torch.is_inference_mode_enabled()
            self.log_explanations(trainer, pl_module)


def test_logging_from_a_validation_hook_under_inference_mode(tmp_path) -> None:
    callback = FromValidation(num_images=2, every_n_epochs=None, log_at_fit_start=False, every_n_steps=1000)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path))
    model, data = TinyClassifier(), BlobData()
    trainer.fit(model, datamodule=data)
    assert not (tmp_path / "semantic_pullback_logs").exists()
    trainer.validate(model, datamodule=data, verbose=False)
    assert callback.inference_mode
    (run,) = (tmp_path / "semantic_pullback_logs").iterdir()
    assert (run / "semantic_pullback" / "overview" / "step_00000004.png").is_file()


def live_tensors() -> tuple[int, int]:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # isinstance on torch's deprecated module proxies warns
        tensors = [o for o in gc.get_objects() if isinstance(o, Tensor)]
    return len(tensors), sum(t.untyped_storage().nbytes() for t in tensors)


def test_memory_stays_flat_over_100_calls(tmp_path) -> None:
    callback = SemanticPullbackCallback(num_images=1, every_n_epochs=None, log_at_fit_start=False, every_n_steps=99)
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, limit_train_batches=1))
    trainer.fit(TinyClassifier(), datamodule=BlobData())
    model = trainer.lightning_module
    written: list[int] = []

    class Counting(ImageSink):
        def log_images(self, images: Any, step: int, caption: str) -> None:
            written.append(len(images))

    callback._writer = PanelWriter([Counting()], None, background=True)  # no files: encoding them is slow, not ours

    def call() -> None:
        callback._last_step = None  # allow another log at the same step
        callback.log_explanations(trainer, model)

    for _ in range(3):
        call()
    # Images are drawn on a background thread: count tensors with none in flight, the thread joined
    # (it drops its last frame just after finishing it). The next log starts a new thread.
    assert callback._writer.close() is None
    before = live_tensors()
    for _ in range(100):
        call()
    assert callback._writer.close() is None
    assert live_tensors() == before
    assert written == [2] * 103  # every call explained and drew its panels
    assert not any(p.grad is not None for p in model.parameters())


def test_bf16_mixed_explains_in_float32(tmp_path) -> None:
    callback = SemanticPullbackCallback(num_images=2, every_n_epochs=None, metrics=["faithfulness_correlation"])
    original = callback.explain
    seen: dict[str, list] = {"explain": [], "train": []}

    def spy(model: nn.Module, images: Tensor, labels: Tensor | None) -> Explanations:
        seen["explaining"] = True
        try:
            return original(model, images, labels)
        finally:
            seen["explaining"] = False

    callback.explain = spy  # type: ignore[method-assign]
    module = TinyClassifier()
    module.model.head.register_forward_hook(
        lambda m, i, out: seen["explain" if seen.get("explaining") else "train"].append(out.dtype)
    )
    trainer = pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, precision="bf16-mixed", limit_train_batches=2))
    trainer.fit(module, datamodule=BlobData())
    assert torch.bfloat16 in seen["train"]  # autocast was on for training
    assert seen["explain"] and set(seen["explain"]) == {torch.float32}
    images, labels = callback.probe.images, callback.probe.labels
    with torch.autocast("cpu", dtype=torch.bfloat16):  # even when called inside autocast
        result = callback.explain(module, images, labels)
    reference = SoftPullback(module).attribute(images, result.targets)
    assert result.soft_maps.dtype == torch.float32
    assert torch.equal(result.soft_maps, reduce_channels(reference))


def test_logits_from_an_attribute_model(tmp_path) -> None:
    class LossForward(TinyClassifier):
        def forward(self, x: Tensor, y: Tensor) -> Tensor:  # not images -> logits
            return nn.functional.cross_entropy(self.model(x), y)

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return self(*batch)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            self(*batch)

    with pytest.raises(ValueError, match="cannot read logits from LossForward.*model_attr"):
        pl.Trainer(callbacks=[SemanticPullbackCallback(num_images=2)], **trainer_kwargs(tmp_path)).fit(
            LossForward(), datamodule=BlobData()
        )
    callback = SemanticPullbackCallback(num_images=2, model_attr="model", every_n_epochs=None)
    pl.Trainer(callbacks=[callback], **trainer_kwargs(tmp_path, limit_train_batches=1)).fit(
        LossForward(), datamodule=BlobData()
    )
    (run,) = (tmp_path / "semantic_pullback_logs").iterdir()
    assert (run / "semantic_pullback" / "overview" / "step_00000000.png").is_file()


class Data(pl.LightningDataModule):
    """Arbitrary validation tensors (and a normal training set)."""

    def __init__(self, val: tuple[Tensor, ...] | None) -> None:
        super().__init__()
        self.val = val

    def train_dataloader(self) -> DataLoader:
        return BlobData().train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.val), batch_size=4)


class Blobs4(Data):
    def __init__(self) -> None:
        super().__init__(blob_images(8))


class DictOutput(Flaky):
    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"features": super().forward(x)}


class MapOutput(Flaky):
    def forward(self, x: Tensor) -> Tensor:
        return x  # (B, C, H, W): not logits


images8, labels8 = blob_images(8)


@pytest.mark.parametrize(
    ("model", "data", "options", "error", "match"),
    [
        (Flaky, Data((images8[:3], labels8[:3])), {}, ValueError, r"only 3 images .*num_images=8"),
        (Flaky, Data((torch.rand(8, 10), labels8)), {}, ValueError, r"\(N, C, H, W\)"),
        (Flaky, Data((images8[:, 0], labels8)), {}, ValueError, r"\(N, C, H, W\)"),
        (Flaky, Data(((images8 * 50).to(torch.uint8), labels8)), {}, TypeError, "floating point"),
        (DictOutput, Blobs4(), {}, ValueError, "cannot read logits from DictOutput"),
        (MapOutput, Blobs4(), {}, ValueError, r"cannot read logits .*\(B, num_classes\)"),
        (Flaky, Data((images8, labels8 + 6)), {}, ValueError, r"labels range over \[6, 9\] .* 4 classes"),
        (Flaky, Blobs4(), {"top_k": 4}, ValueError, "top_k=4 but the model has only 3 classes"),
        (Flaky, Blobs4(), {"class_names": ["a", "b"]}, ValueError, "2 class names for a model with 4 classes"),
        (Flaky, Blobs4(), {"mean": [0.5, 0.5], "std": [0.2, 0.2]}, ValueError, "mean has 2 values but .* 3 channels"),
        (Flaky, Blobs4(), {"input_bounds": ([0, 0], 1)}, ValueError, "input_bounds has 2 values"),
        (Flaky, Blobs4(), {"model_attr": "backbone"}, AttributeError, "no nn.Module attribute"),
    ],
)
def test_clear_errors_at_fit_start(tmp_path, model, data, options, error, match) -> None:
    instance = model()
    trainer = pl.Trainer(callbacks=[SemanticPullbackCallback(**options)], **trainer_kwargs(tmp_path))
    with pytest.raises(error, match=match):
        trainer.fit(instance, datamodule=data)
    assert instance.steps == 0  # before any training step


def test_no_validation_data_and_no_images_is_a_clear_error(tmp_path) -> None:
    model = Flaky()
    trainer = pl.Trainer(callbacks=[SemanticPullbackCallback()], **trainer_kwargs(tmp_path))
    with pytest.raises(RuntimeError, match="needs probe images.*images=\\.\\.\\."):
        trainer.fit(model, train_dataloaders=BlobData().train_dataloader())
    assert model.steps == 0


def test_logging_before_set_up_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="set-up done at fit start"):
        SemanticPullbackCallback().log_explanations(SimpleNamespace(global_step=0), TinyClassifier())


def test_deepspeed_is_refused_with_the_alternatives() -> None:
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)  # its __init__ needs the deepspeed package
    with pytest.raises(RuntimeError, match="does not support DeepSpeedStrategy.*ModelParallelStrategy.*FSDPStrategy"):
        SemanticPullbackCallback().on_fit_start(SimpleNamespace(strategy=deepspeed), TinyClassifier())


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"num_images": 0}, ValueError, "num_images must be an integer >= 1"),
        ({"top_k": 1.5}, ValueError, "top_k must be an integer"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps must be an integer >= 1 or None"),
        ({"every_n_epochs": None, "log_at_fit_start": False}, ValueError, "Nothing is scheduled"),
        ({"ascent_alpha": -1.0}, ValueError, "ascent_alpha must be > 0"),
        ({"reduction": "max"}, ValueError, "reduction must be one of"),
        ({"color_scale": 0}, ValueError, "color_scale must be > 0"),
        ({"opacity": 2}, ValueError, "opacity must lie in"),
        ({"min_image_size": 300}, ValueError, "min_image_size <= max_image_size"),
        ({"on_error": "ignore"}, ValueError, "on_error must be 'raise' or 'warn'"),
        ({"logits_fn": "not callable"}, TypeError, "logits_fn must be callable"),
        ({"mean": [0.5]}, ValueError, "mean and std together"),
        ({"mean": [0.5], "std": [0.0]}, ValueError, "std > 0"),
        ({"input_bounds": (0.0,)}, ValueError, "pair"),
        ({"class_names": ["a", 1]}, TypeError, "list of strings"),
        ({"temperatures": {"relu": -1}}, ValueError, "relu"),
        ({"labels": [0, 1]}, ValueError, "labels were given without images"),
        ({"images": torch.rand(2, 8, 8)}, ValueError, r"\(N, C, H, W\)"),
        ({"metrics": ["random_logit", "focus"]}, ValueError,
         r"Unknown metrics \['focus'\]; choose from \['faithfulness_correlation', .*'random_logit'\]"),
        ({"metrics": "infidelity"}, TypeError, "metrics must be a list of metric names"),
        ({"metrics": ["infidelity", "infidelity"]}, ValueError, "lists a name twice"),
    ],
)
def test_invalid_arguments_fail_at_construction(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        SemanticPullbackCallback(**options)
