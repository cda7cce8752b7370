"""SoftBackwardTraining and temperature schedules: the issue's guarantees, each one a test."""

from __future__ import annotations

import copy
import csv
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from _soft_training_models import BatchNormCNN, SmallCNN, TinyMLP, active_relu_tau, cnn_data, loader, mlp_data, mlp_grads, trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.overrides import _get_current_function_mode_stack
from torch.utils.checkpoint import CheckpointError, checkpoint

from sp_lightning import (
    DEFAULT_TEMPERATURES,
    Gradient,
    RuleSchedules,
    SoftBackwardTraining,
    SoftPullback,
    TemperatureSchedule,
    soft_backward,
)


def fit(model: TinyMLP, callbacks: list[Callback], data: Any = None, **kwargs: Any) -> TinyMLP:
    """Fit ``model`` in place on the in-order MLP data; returns it."""
    trainer(callbacks=callbacks, **kwargs).fit(model, loader(mlp_data() if data is None else data))
    return model


def params(model: nn.Module) -> list[Tensor]:
    """Detached copies of the parameters."""
    return [p.detach().clone() for p in model.parameters()]


def sgd(before: list[Tensor], grads: list[Tensor], lr: float) -> list[Tensor]:
    """One plain SGD step by hand."""
    return [p - lr * g for p, g in zip(before, grads)]


def assert_close(a: list[Tensor], b: list[Tensor], atol: float = 1e-6) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-5)


def differs(a: list[Tensor], b: list[Tensor], margin: float = 1e-4) -> bool:
    """Whether two parameter lists differ by more than ``margin`` somewhere."""
    return max((x - y).abs().max().item() for x, y in zip(a, b)) > margin


# --------------------------------------------------------------------------- the core guarantees


def test_step0_loss_identical_and_one_step_is_the_hand_computed_soft_step() -> None:
    torch.manual_seed(0)
    base = TinyMLP()
    before = params(base)
    x, y = mlp_data()[:8]
    soft = fit(copy.deepcopy(base), [SoftBackwardTraining()], max_steps=1)  # zero-arg use
    hard = fit(copy.deepcopy(base), [], max_steps=1)

    assert torch.equal(soft.losses[0], hard.losses[0])  # forward and loss untouched
    assert soft.step_taus == [DEFAULT_TEMPERATURES["relu"]]
    assert differs(params(soft), params(hard))  # the backward really changed
    assert_close(params(soft), sgd(before, mlp_grads(before, x, y, tau=0.6), lr=base.lr))
    assert_close(params(hard), sgd(before, mlp_grads(before, x, y, tau=None), lr=base.lr))


def test_disabling_the_persistent_mode_restores_standard_training_exactly() -> None:
    """Plain-PyTorch form: ``soft_backward(model).enable()`` ... ``.disable()``, then standard steps."""
    torch.manual_seed(1)
    x, y = mlp_data()[:8]

    def step(net: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    def run(soft_steps: int) -> tuple[nn.Module, list[Tensor]]:
        torch.manual_seed(2)
        net = TinyMLP().net
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        handle = soft_backward(net).enable()
        for _ in range(soft_steps):
            step(net, opt)
        handle.disable()
        after_soft = params(net)
        step(net, opt)
        return net, after_soft

    net, after_soft = run(soft_steps=1)
    assert not net._forward_hooks and not net._forward_pre_hooks
    assert _get_current_function_mode_stack() == []
    reference = TinyMLP().net
    with torch.no_grad():
        for p, q in zip(reference.parameters(), after_soft):
            p.copy_(q)
    step(reference, torch.optim.SGD(reference.parameters(), lr=0.5))
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), reference.parameters()))
    assert differs(after_soft, params(run(soft_steps=0)[0]))  # the soft step itself was not a plain one


def test_plain_pytorch_scheduled_loop_gives_the_hand_computed_steps() -> None:
    """The README's custom-loop form: new rules per step, backward outside the ``with`` block."""
    torch.manual_seed(13)
    net = TinyMLP().net
    expected = params(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    plan = RuleSchedules.create({"relu": 1.0}, schedule={"kind": "linear", "tau_end": 0.5, "stop": 2})
    data = mlp_data()
    for step, tau in enumerate((1.0, 0.75)):
        x, y = data[8 * step : 8 * step + 8]
        expected = sgd(expected, mlp_grads(expected, x, y, tau=tau), lr=0.5)
        with soft_backward(net, plan.rules_at(step, epoch=0)):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert_close(params(net), expected)


def test_callback_leaves_no_trace_after_fit_or_failure() -> None:
    """After the fit (or an exception inside it) the strategy and the mode stack are as Lightning left them."""

    class Boom(TinyMLP):
        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            if batch_idx == 1:
                raise RuntimeError("boom")
            return super().training_step(batch, batch_idx)

    for model, expect_error in ((TinyMLP(), False), (Boom(), True)):
        t = trainer(callbacks=[SoftBackwardTraining()], max_epochs=1)
        if expect_error:
            with pytest.raises(RuntimeError, match="boom"):
                t.fit(model, loader(mlp_data()))
        else:
            t.fit(model, loader(mlp_data()))
        assert "training_step" not in vars(t.strategy)
        assert _get_current_function_mode_stack() == []
        assert model.step_taus and all(tau == 0.6 for tau in model.step_taus)


def test_warmup_step0_is_standard_training_then_soft() -> None:
    """A warm-up starts from the plain gradient (rules off at t=0) and ramps tau up linearly."""
    torch.manual_seed(3)
    base = TinyMLP()
    schedule = {"warmup": 2}
    soft = fit(copy.deepcopy(base), [SoftBackwardTraining(schedule=schedule)], max_steps=3)
    hard = fit(copy.deepcopy(base), [], max_steps=1)
    assert soft.step_taus == [None, 0.3, 0.6]
    first = fit(copy.deepcopy(base), [SoftBackwardTraining(schedule=schedule)], max_steps=1)
    assert all(torch.equal(p, q) for p, q in zip(first.parameters(), hard.parameters()))


def test_all_rules_off_is_standard_training_exactly() -> None:
    torch.manual_seed(4)
    base = TinyMLP()
    off = SoftBackwardTraining(temperatures={name: None for name in DEFAULT_TEMPERATURES})
    soft = fit(copy.deepcopy(base), [off], max_steps=2)
    hard = fit(copy.deepcopy(base), [], max_steps=2)
    assert soft.step_taus == [None, None]
    assert all(torch.equal(p, q) for p, q in zip(soft.parameters(), hard.parameters()))


# --------------------------------------------------------------------------- bad configuration


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"temperatures": {"rleu": 0.5}}, ValueError, "Unknown soft rule name"),
        ({"temperatures": {"relu": 0.0}}, ValueError, "must be a finite number > 0"),
        ({"temperatures": {"relu": -1.0}}, ValueError, "must be a finite number > 0"),
        ({"schedule": {"kind": "linear", "tau_end": 0.1, "start": 10, "stop": 5}}, ValueError, "ends .*before it starts"),
        ({"schedule": {"kind": "cosine", "tau_end": 0.1, "warmup": 8, "stop": 8}}, ValueError, "ends .*before it starts"),
        ({"schedule": {"kind": "linear", "tau_end": 0.0}}, ValueError, "tau_end, a finite temperature > 0"),
        ({"schedule": {"kind": "linear"}}, ValueError, "needs tau_end"),
        ({"schedule": {"kind": "exponential"}}, ValueError, "kind must be one of"),
        ({"schedule": {"unit": "batch"}}, ValueError, "unit must be one of"),
        ({"schedule": {"kind": "linear", "tau_end": 0.1, "warmup": 5, "start": 2}}, ValueError, "start must be an integer >= 5"),
        ({"schedule": {"tau_end": 0.1}}, ValueError, "constant schedule does not use"),
        ({"schedule": {"kind": "linear", "tau_final": 0.1}}, ValueError, "Unknown temperature schedule setting"),
        ({"schedule": "cosine"}, TypeError, "dict of its fields"),
        ({"rule_schedules": {"layernorm": {"warmup": 1}}}, ValueError, "has no temperature"),
        ({"rule_schedules": {"softmax": {"warmup": 1}}}, ValueError, "Unknown soft rule name"),
        ({"temperatures": {"gelu": None}, "rule_schedules": {"gelu": {"warmup": 1}}}, ValueError, "switched off"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        SoftBackwardTraining(**kwargs)


def test_unbounded_run_with_open_ended_schedule_fails_clearly_at_fit_start() -> None:
    cb = SoftBackwardTraining(schedule={"kind": "linear", "tau_end": 0.1, "unit": "epoch"})
    with pytest.raises(ValueError, match="no max_epochs"):
        fit(TinyMLP(), [cb], max_epochs=-1, max_steps=2)
    assert _get_current_function_mode_stack() == []


def test_an_already_wrapped_training_step_is_refused_clearly() -> None:
    with pytest.raises(RuntimeError, match="more than one stateful callback"):  # Lightning refuses two of us
        trainer(callbacks=[SoftBackwardTraining(), SoftBackwardTraining()])
    t = trainer(callbacks=[SoftBackwardTraining()], max_steps=1)
    other = t.strategy.training_step
    t.strategy.training_step = other  # someone else's wrapper, as an instance attribute
    with pytest.raises(RuntimeError, match="already has a patched training_step"):
        t.fit(TinyMLP(), loader(mlp_data()))
    assert vars(t.strategy)["training_step"] is other  # left as it was


# --------------------------------------------------------------------------- schedules


def test_schedule_curves() -> None:
    lin = TemperatureSchedule(kind="linear", tau_end=0.1, start=2, stop=6)
    assert [lin.tau(1.0, t) for t in (0, 2, 4, 6, 9)] == pytest.approx([1.0, 1.0, 0.55, 0.1, 0.1])
    cos = TemperatureSchedule(kind="cosine", tau_end=0.2, stop=4)
    expected = [0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(5)]
    assert [cos.tau(1.0, t) for t in range(5)] == pytest.approx(expected)
    warm = TemperatureSchedule(kind="linear", tau_end=0.5, warmup=4, stop=8)
    assert [warm.tau(2.0, t) for t in (0, 1, 3, 4, 6, 8)] == pytest.approx([None, 0.5, 1.5, 2.0, 1.25, 0.5])
    with pytest.raises(RuntimeError, match="resolved"):
        TemperatureSchedule(kind="linear", tau_end=0.1).tau(1.0, 3)
    with pytest.raises(ValueError, match="only starts annealing"):
        TemperatureSchedule(kind="linear", tau_end=0.1, warmup=5).resolved(5)


def test_per_rule_schedules_and_units() -> None:
    plan = RuleSchedules.create(
        {"relu": 1.0, "maxpool": 0.4, "gelu": None},
        schedule={"kind": "linear", "tau_end": 0.2, "stop": 10},
        rule_schedules={"maxpool": {"kind": "cosine", "tau_end": 0.1, "unit": "epoch", "stop": 2}},
    )
    assert "gelu" not in plan.schedules and "layernorm" not in plan.schedules
    taus = plan.temperatures_at(step=5, epoch=1)
    assert taus["relu"] == pytest.approx(0.6)
    assert taus["silu"] == pytest.approx(1.6 + (0.2 - 1.6) * 0.5)
    assert taus["maxpool"] == pytest.approx(0.25)
    rules = plan.rules_at(step=5, epoch=1)
    assert rules.tau("relu") == pytest.approx(0.6) and rules.tau("gelu") is None and rules.tau("layernorm") is True


def test_linear_schedule_over_the_run_is_used_and_logged(tmp_path: Any) -> None:
    """tau(t) is what the training step really runs with, and what the logger records."""
    cb = SoftBackwardTraining(temperatures={"relu": 1.0}, schedule={"kind": "linear", "tau_end": 0.2})
    model = fit(TinyMLP(), [cb], max_steps=4, logger=CSVLogger(tmp_path, name="run"), log_every_n_steps=1)
    expected = [1.0 - 0.8 * t / 4 for t in range(4)]
    assert model.step_taus == pytest.approx(expected)
    with open(next(tmp_path.rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    logged = [float(r["soft_training/tau_relu"]) for r in rows if r.get("soft_training/tau_relu")]
    assert logged == pytest.approx(expected)


# --------------------------------------------------------------------------- works with ...


def test_gradient_accumulation_and_clipping_give_the_hand_computed_step() -> None:
    torch.manual_seed(5)
    base = TinyMLP(lr=1.0)
    before = params(base)
    data = mlp_data()
    clip = 0.05
    soft = fit(
        copy.deepcopy(base),
        [SoftBackwardTraining(temperatures={"relu": 0.8})],
        data,
        max_steps=1,
        accumulate_grad_batches=2,
        gradient_clip_val=clip,
    )
    assert len(soft.losses) == 2 and soft.step_taus == [0.8, 0.8]
    g1 = mlp_grads(before, *data[:8], tau=0.8)
    g2 = mlp_grads(before, *data[8:16], tau=0.8)
    grads = [(a + b) / 2 for a, b in zip(g1, g2)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > clip  # clipping really acts
    scale = clip / (norm + 1e-6)
    assert_close(params(soft), sgd(before, [g * scale for g in grads], lr=base.lr))


def test_bf16_mixed_precision() -> None:
    torch.manual_seed(6)
    base = SmallCNN()
    runs = {
        (precision, soft): fit(
            copy.deepcopy(base), [SoftBackwardTraining()] if soft else [], cnn_data(), max_steps=2, precision=precision
        )
        for precision in ("bf16-mixed", "32-true")
        for soft in (True, False)
    }
    soft16, hard16, soft32 = runs["bf16-mixed", True], runs["bf16-mixed", False], runs["32-true", True]
    assert torch.equal(soft16.losses[0], hard16.losses[0])
    assert soft16.losses[0].dtype == torch.float32  # autocast computed the loss in float32
    assert all(torch.isfinite(p).all() for p in soft16.parameters())
    moved_soft = [p - q for p, q in zip(params(soft16), params(base))]
    to_soft32 = max((p - q).abs().max().item() for p, q in zip(params(soft16), params(soft32)))
    to_hard16 = max((p - q).abs().max().item() for p, q in zip(params(soft16), params(hard16)))
    assert max(m.abs().max().item() for m in moved_soft) > 10 * to_soft32  # bf16 soft ~ float32 soft
    assert to_hard16 > 2 * to_soft32  # and not the plain bf16 step


def test_torch_compile_matches_eager_and_warns_about_per_step_schedules() -> None:
    torch.manual_seed(8)
    base = SmallCNN()
    schedule = {"kind": "linear", "tau_end": 0.3, "stop": 2}
    eager = fit(copy.deepcopy(base), [SoftBackwardTraining(schedule=schedule)], cnn_data(), max_steps=2)
    compiled = copy.deepcopy(base)
    compiled.net = torch.compile(compiled.net)
    with pytest.warns(UserWarning, match="recompiles"):
        fit(compiled, [SoftBackwardTraining(schedule=schedule)], cnn_data(), max_steps=2)
    hard = fit(copy.deepcopy(base), [], cnn_data(), max_steps=2)
    assert compiled.step_taus == eager.step_taus == pytest.approx([0.6, 0.45])
    assert_close(params(compiled), params(eager), atol=1e-5)
    assert differs(params(compiled), params(hard))


def test_train_mode_batchnorm_recipe_under_torch_compile_and_bf16() -> None:
    """The ReLU after a train-mode BatchNorm recomputes x from the batch statistics: compiled training
    matches eager training, and bf16-mixed stays close to float32 (and away from the plain step)."""
    torch.manual_seed(9)
    base = BatchNormCNN()
    eager = fit(copy.deepcopy(base), [SoftBackwardTraining()], cnn_data(), max_steps=2)
    compiled = copy.deepcopy(base)
    compiled.net = torch.compile(compiled.net)
    fit(compiled, [SoftBackwardTraining()], cnn_data(), max_steps=2)
    hard = fit(copy.deepcopy(base), [], cnn_data(), max_steps=2)
    assert_close(params(compiled), params(eager), atol=1e-5)
    assert differs(params(eager), params(hard))
    soft16 = fit(copy.deepcopy(base), [SoftBackwardTraining()], cnn_data(), max_steps=2, precision="bf16-mixed")
    to_soft32 = max((p - q).abs().max().item() for p, q in zip(params(soft16), params(eager)))
    to_hard = max((p - q).abs().max().item() for p, q in zip(params(soft16), params(hard)))
    assert to_hard > 2 * to_soft32


def test_manual_optimization_every_forward_of_the_step_is_soft() -> None:
    class TwoPasses(TinyMLP):
        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch: Any, batch_idx: int) -> None:
            opt = self.optimizers()
            for _ in range(2):
                self.step_taus.append(active_relu_tau())
                opt.zero_grad()
                self.manual_backward(F.cross_entropy(self.net(batch[0]), batch[1]))
                opt.step()

    torch.manual_seed(9)
    model = fit(TwoPasses(), [SoftBackwardTraining()], max_steps=2)
    assert model.step_taus == [0.6, 0.6]  # max_steps counts optimizer steps: one batch, two passes


def test_closure_optimizers_re_run_every_step_soft() -> None:
    """LBFGS re-evaluates the closure (training step + backward) several times per optimizer step."""

    class WithLBFGS(TinyMLP):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.LBFGS(self.parameters(), lr=0.1, max_iter=3)

    model = fit(WithLBFGS(), [SoftBackwardTraining()], max_steps=1)
    assert len(model.step_taus) > 1 and set(model.step_taus) == {0.6}


def test_activation_checkpointing_fails_loudly_and_works_with_checkpoint_context() -> None:
    class Checkpointed(TinyMLP):
        def __init__(self, context: bool) -> None:
            super().__init__()
            self.context = context

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            (soft,) = [c for c in self.trainer.callbacks if isinstance(c, SoftBackwardTraining)]
            context = {"context_fn": soft.checkpoint_context} if self.context else {}
            logits = checkpoint(self.net, batch[0], use_reentrant=False, **context)
            return F.cross_entropy(logits, batch[1])

    torch.manual_seed(12)
    base = TinyMLP()
    reference = fit(copy.deepcopy(base), [SoftBackwardTraining()], max_steps=2)
    with pytest.raises(CheckpointError):
        fit(Checkpointed(context=False), [SoftBackwardTraining()], max_steps=1)
    model = Checkpointed(context=True)
    model.load_state_dict(base.state_dict())
    fit(model, [SoftBackwardTraining()], max_steps=2)
    assert_close(params(model), params(reference))


# --------------------------------------------------------------------------- evaluation and explanations


class ExplainInHooks(Callback):
    """Stands in for an explanation callback: explains in validation and after training batches."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y
        self.seen: list[tuple[TinyMLP, Tensor, Tensor]] = []

    def _explain(self, pl_module: Any) -> None:
        assert _get_current_function_mode_stack() == []
        grad = Gradient(pl_module).attribute(self.x, self.y)
        sp = SoftPullback(pl_module).attribute(self.x, self.y)
        with torch.inference_mode(False):  # validation runs under inference mode; keep a usable copy
            self.seen.append((copy.deepcopy(pl_module), grad, sp))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self._explain(pl_module)

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        self._explain(pl_module)


def test_validation_test_predict_and_explanations_never_see_the_training_rules() -> None:
    torch.manual_seed(10)
    x, y = mlp_data()[:4]
    explain = ExplainInHooks(x, y)
    cb = SoftBackwardTraining()
    t = trainer(callbacks=[cb, explain], max_steps=2, val_check_interval=1, check_val_every_n_epoch=None)
    model = TinyMLP()
    t.fit(model, loader(mlp_data()), loader(mlp_data(8, seed=1)))
    t.validate(model, loader(mlp_data(8, seed=1)))
    t.test(model, loader(mlp_data(8, seed=1)))
    t.predict(model, loader(mlp_data(8, seed=1)))
    assert model.step_taus == [0.6, 0.6]
    assert model.eval_modes and all(tau is None for tau in model.eval_modes)
    assert len(explain.seen) >= 4
    for snapshot, grad, sp in explain.seen:  # same explanations as on a model that never met the callback
        assert torch.equal(grad, Gradient(snapshot).attribute(x, y))
        assert torch.equal(sp, SoftPullback(snapshot).attribute(x, y))
    assert not torch.allclose(explain.seen[0][1], explain.seen[0][2])  # gradient is not the pullback


# --------------------------------------------------------------------------- checkpoints


def test_resume_from_checkpoint_continues_the_schedule_exactly(tmp_path: Any) -> None:
    """Two batches per epoch, 4 epochs, linear over the run; resume from the epoch-2 checkpoint."""
    schedule = {"kind": "linear", "tau_end": 0.1}
    torch.manual_seed(11)
    base = TinyMLP()
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1, save_top_k=-1, filename="{epoch}")
    full = fit(copy.deepcopy(base), [SoftBackwardTraining(schedule=schedule), ckpt], max_epochs=4, enable_checkpointing=True)
    path = tmp_path / "epoch=1.ckpt"
    state = torch.load(path, weights_only=False)["callbacks"]["SoftBackwardTraining"]
    assert state["resolved"]["relu"]["stop"] == 8

    resumed = copy.deepcopy(base)
    cb = SoftBackwardTraining(schedule=schedule)
    trainer(callbacks=[cb], max_epochs=4).fit(resumed, loader(mlp_data()), ckpt_path=path)
    assert resumed.step_taus == pytest.approx(full.step_taus[4:])
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), full.parameters()))


def test_resumed_longer_run_keeps_the_checkpointed_schedule_and_a_changed_config_warns(tmp_path: Any) -> None:
    schedule = {"kind": "linear", "tau_end": 0.1}
    first = trainer(callbacks=[SoftBackwardTraining(schedule=schedule)], max_steps=4)
    first.fit(TinyMLP(), loader(mlp_data()))
    first.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["callbacks"]["SoftBackwardTraining"]
    assert state["resolved"]["relu"]["stop"] == 4

    longer = TinyMLP()
    trainer(callbacks=[SoftBackwardTraining(schedule=schedule)], max_steps=6).fit(
        longer, loader(mlp_data()), ckpt_path=tmp_path / "last.ckpt"
    )
    assert longer.step_taus == pytest.approx([0.1, 0.1])  # annealing ended at step 4, as checkpointed

    other = SoftBackwardTraining(schedule={"kind": "cosine", "tau_end": 0.1})
    with pytest.warns(UserWarning, match="different soft-training configuration"):
        other.load_state_dict(state)
    assert other.state_dict()["resolved"] is None
