"""``SoftBackwardTraining``: train with the soft backward rules (docs/method.md section 5).

The forward pass, the loss and every prediction stay exactly as they are; only
the backward that reaches the weights uses the soft gates. The callback does
this by running the trainer strategy's ``training_step`` (which wraps the
LightningModule's ``training_step``, its forward redirection under DDP/FSDP and
the precision plugin's autocast) inside the engine's stateless
:class:`~sp_lightning.engine.SoftBackwardMode`. So:

- every op of the training step is covered, also ops the ``training_step``
  runs outside ``forward`` (``self.backbone(x)``, ``F.relu`` inline), and
  every forward of the step (manual optimization, closure-based optimizers
  such as LBFGS that re-run the step);
- validation, test, predict, sanity checks and every callback hook run
  outside the mode: explanation callbacks see the plain model;
- the user's model is never touched (no hooks, no swapped modules); the
  strategy gets its own ``training_step`` back when training ends or fails;
- under FSDP2 (``ModelParallelStrategy``) the sharded modules' backward uses
  the soft gates like any other (the rules act on ops, not on modules), and the
  schedule travels in sharded checkpoints with the other callback states.
  DeepSpeed is refused (see :func:`~sp_lightning.distributed.refuse_deepspeed`).

Temperatures can follow a schedule (:mod:`sp_lightning.schedule`); the rules
are rebuilt (a new immutable ``SoftRules`` and mode) only when a temperature
changes, at the start of a training batch, and the current values are logged
as ``soft_training/tau_<rule>``.
"""

from __future__ import annotations

import functools
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch._dynamo import OptimizedModule

from ..distributed import refuse_deepspeed
from ..engine import MaxPoolPadding, SoftBackwardMode, SoftRules
from ..schedule import RuleSchedules, TemperatureSchedule

#: Prefix of the logged temperature scalars.
LOG_PREFIX = "soft_training/tau_"


def uses_torch_compile(module: nn.Module) -> bool:
    """Whether ``module`` (a LightningModule) or any submodule runs through ``torch.compile``."""
    if getattr(module, "_compiler_ctx", None) is not None:  # a compiled LightningModule passed to fit()
        return True
    return any(
        isinstance(m, OptimizedModule) or getattr(m, "_compiled_call_impl", None) is not None for m in module.modules()
    )


class SoftBackwardTraining(Callback):
    """Make every training backward use the soft rules, for the whole fit.

    Zero-arg use trains with the documented default temperatures held constant.

    Args:
        temperatures: rule name -> starting temperature tau0 (``None`` switches a
            rule off); missing rules take the documented defaults (``DEFAULT_TEMPERATURES``).
        schedule: how every tempered rule's temperature moves: a
            :class:`~sp_lightning.schedule.TemperatureSchedule` or a dict of its
            fields, e.g. ``{"kind": "cosine", "tau_end": 0.05}``. Default: constant.
        rule_schedules: per-rule schedules replacing ``schedule`` for the rules named.
        maxpool_padding: ``"neginf"`` (exact max-pool semantics) or ``"zeros"`` (reference-code compatibility).
        warn_uncovered: warn when a gated op with no soft rule runs in the training step.
        log_temperatures: log the current temperature of every scheduled rule as
            ``soft_training/tau_<rule>`` (0 while a warm-up holds the rule off).

    Bad settings (unknown rule, tau <= 0, a schedule that ends before it starts)
    raise here, at construction.
    """

    def __init__(
        self,
        temperatures: dict[str, float | bool | None] | None = None,
        schedule: TemperatureSchedule | dict[str, Any] | None = None,
        rule_schedules: dict[str, TemperatureSchedule | dict[str, Any]] | None = None,
        maxpool_padding: MaxPoolPadding = "neginf",
        warn_uncovered: bool = True,
        log_temperatures: bool = True,
    ) -> None:
        self.plan = RuleSchedules.create(
            temperatures, schedule, rule_schedules, maxpool_padding=maxpool_padding, warn_uncovered=warn_uncovered
        )
        self.log_temperatures = bool(log_temperatures)
        self._resolved: RuleSchedules | None = None
        self._mode: SoftBackwardMode | None = None
        self._current: dict[str, float | None] | None = None
        self._patched: tuple[Any, Any] | None = None  # (strategy, our training_step)

    # ------------------------------------------------------------------ public state

    @property
    def rules(self) -> SoftRules | None:
        """The rules the next training step uses (``None`` before training or while every rule is off)."""
        return None if self._mode is None else self._mode.rules

    @property
    def temperatures(self) -> dict[str, float | None]:
        """Current temperature of every scheduled rule (``None``: off); empty before training starts."""
        return dict(self._current or {})

    def checkpoint_context(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """``context_fn`` for non-reentrant ``torch.utils.checkpoint``: recompute under the step's soft rules.

        Activation checkpointing re-runs the forward during the backward, outside
        the training step and so outside the mode; without this the recomputed
        tensors differ and torch raises ``CheckpointError``. Use
        ``checkpoint(block, x, use_reentrant=False, context_fn=callback.checkpoint_context)``.
        (Reentrant checkpointing cannot be helped: its blocks get the plain gradient.)
        """
        rules = self.rules
        return nullcontext(), (nullcontext() if rules is None else SoftBackwardMode(rules))

    # ------------------------------------------------------------------ Lightning hooks

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage == "fit":  # a new fit: forget the last one's schedule (a checkpoint may restore it next)
            refuse_deepspeed(trainer, type(self).__name__)
            self._resolved, self._mode, self._current = None, None, None

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._resolved is None:
            self._resolved = self.plan.resolved(self._training_length(trainer))
        if uses_torch_compile(pl_module) and self.plan.changes_every_step:
            rank_zero_warn(
                "SoftBackwardTraining: the model uses torch.compile and a temperature schedule changes tau every "
                "optimizer step. Dynamo specialises the compiled graph on each tau, so every new value recompiles "
                "(past torch._dynamo.config.recompile_limit, dynamo falls back to eager for those frames). "
                "Use unit='epoch' or a constant schedule with torch.compile."
            )
        self._install(trainer)

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._advance(trainer.global_step, trainer.current_epoch)
        if self.log_temperatures and self._current and trainer.loggers:
            values = {f"{LOG_PREFIX}{name}": 0.0 if tau is None else tau for name, tau in self._current.items()}
            pl_module.log_dict(values, on_step=True, on_epoch=False, logger=True, prog_bar=False)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._uninstall()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._uninstall()

    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._uninstall()

    def state_dict(self) -> dict[str, Any]:
        """The configuration and the schedule as resolved for this run (its ``stop`` points)."""
        return {
            "config": self.plan.config(),
            "resolved": None if self._resolved is None else self._resolved.config()["schedules"],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the checkpointed schedule (same stop points) if the configuration is unchanged."""
        if state_dict.get("config") != self.plan.config():
            rank_zero_warn(
                "SoftBackwardTraining: the checkpoint was written with a different soft-training configuration "
                f"({state_dict.get('config')}); continuing with this callback's settings ({self.plan.config()}), "
                "with stop points recomputed from this run's length."
            )
            return
        resolved = state_dict.get("resolved")
        if resolved is not None:
            schedules = {name: TemperatureSchedule(**fields) for name, fields in resolved.items()}
            self._resolved = RuleSchedules(self.plan.base, schedules)

    # ------------------------------------------------------------------ internals

    def _training_length(self, trainer: "pl.Trainer") -> dict[str, int]:
        """Training length per unit that a schedule without ``stop`` needs (clear error when unbounded)."""
        totals: dict[str, int] = {}
        units = self.plan.units_needing_stop()
        if "step" in units:
            steps = trainer.estimated_stepping_batches
            if not isinstance(steps, int) and not (isinstance(steps, float) and steps.is_integer()):
                raise ValueError(
                    "SoftBackwardTraining: a schedule without stop anneals over the whole run, but this run has no "
                    "bounded number of steps. Set Trainer(max_steps=...) or max_epochs, or give the schedule a stop."
                )
            totals["step"] = int(steps)
        if "epoch" in units:
            epochs = trainer.max_epochs
            if epochs is None or epochs < 1:
                raise ValueError(
                    "SoftBackwardTraining: a schedule with unit='epoch' and no stop anneals over the whole run, but "
                    "this run has no max_epochs. Set Trainer(max_epochs=...) or give the schedule a stop."
                )
            totals["epoch"] = int(epochs)
        return totals

    def _advance(self, step: int, epoch: int) -> None:
        """Rebuild the rules and the mode only when a temperature changes (keeps torch.compile guards stable)."""
        plan = self._resolved or self.plan
        current = plan.temperatures_at(step, epoch)
        if current == self._current:
            return
        self._current = current
        rules = plan.rules_at(step, epoch)
        self._mode = SoftBackwardMode(rules) if rules.any_active else None

    def _install(self, trainer: "pl.Trainer") -> None:
        """Run the strategy's training_step inside the current mode."""
        if self._patched is not None:
            return
        strategy = trainer.strategy
        if "training_step" in vars(strategy):
            raise RuntimeError(
                "SoftBackwardTraining: the trainer's strategy already has a patched training_step (another "
                "SoftBackwardTraining, or a callback that wraps training steps). Use one SoftBackwardTraining per Trainer."
            )
        original = strategy.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            mode = self._mode
            if mode is None:
                return original(*args, **kwargs)
            with mode:
                return original(*args, **kwargs)

        strategy.training_step = training_step
        self._patched = (strategy, training_step)

    def _uninstall(self) -> None:
        """Give the strategy its own training_step back (idempotent)."""
        if self._patched is None:
            return
        strategy, patched = self._patched
        if vars(strategy).get("training_step") is patched:
            del strategy.training_step
        self._patched = None

