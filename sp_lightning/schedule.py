"""Temperature schedules for soft-backward training: which rules at which tau, at time t.

A :class:`TemperatureSchedule` is one curve tau(t) relative to a rule's starting
temperature tau0; :class:`RuleSchedules` pairs the starting ``SoftRules`` with a
schedule per tempered rule and returns the ``SoftRules`` to use at any time.
Both are immutable and validated when built, so a bad configuration fails at
construction (not mid-training), and every setting is a plain number or string
that a YAML file can hold.

Time t counts optimizer steps (``unit="step"``: Lightning's ``global_step``) or
finished epochs (``unit="epoch"``: ``current_epoch``, so tau changes at epoch
boundaries only). The curve:

- ``t < warmup``: linear ramp from 0 to tau0 (at t = 0 the rule is off, i.e.
  the plain gradient; like a learning-rate warm-up from zero);
- ``warmup <= t < start``: tau0;
- ``start <= t < stop``: anneal from tau0 to ``tau_end``, linearly or along a
  half cosine;
- ``t >= stop``: ``tau_end``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from .engine import UNTEMPERED_RULES, MaxPoolPadding, SoftRules

ScheduleKind = Literal["constant", "linear", "cosine"]
ScheduleUnit = Literal["step", "epoch"]
_KINDS: tuple[str, ...] = ("constant", "linear", "cosine")
_UNITS: tuple[str, ...] = ("step", "epoch")


def _check_count(name: str, value: Any, minimum: int) -> None:
    """A schedule time point must be a whole number of steps or epochs, at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"TemperatureSchedule.{name} must be an integer >= {minimum}, got {value!r}.")


@dataclass(frozen=True)
class TemperatureSchedule:
    """tau(t) for a rule that starts at tau0 (see the module docstring for the curve).

    Args:
        kind: ``"constant"``, ``"linear"`` or ``"cosine"``.
        tau_end: the temperature reached at ``stop`` (linear and cosine only); a
            small value (e.g. 0.05) anneals toward the plain gradient.
        start: when annealing begins; default: right after the warm-up.
        stop: when ``tau_end`` is reached; default: the end of training (the
            Lightning callback fills it in from ``max_steps`` / ``max_epochs``).
        warmup: length of the ramp from 0 (plain gradient) up to tau0.
        unit: ``"step"`` (optimizer steps) or ``"epoch"``.
    """

    kind: ScheduleKind = "constant"
    tau_end: float | None = None
    start: int | None = None
    stop: int | None = None
    warmup: int = 0
    unit: ScheduleUnit = "step"

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"TemperatureSchedule.kind must be one of {list(_KINDS)}, got {self.kind!r}.")
        if self.unit not in _UNITS:
            raise ValueError(f"TemperatureSchedule.unit must be one of {list(_UNITS)}, got {self.unit!r}.")
        _check_count("warmup", self.warmup, 0)
        if self.kind == "constant":
            given = [n for n in ("tau_end", "start", "stop") if getattr(self, n) is not None]
            if given:
                raise ValueError(
                    f"A constant schedule does not use {given}; use kind='linear' or 'cosine' to anneal, "
                    "or drop those settings."
                )
            return
        tau_end = self.tau_end
        if isinstance(tau_end, bool) or not isinstance(tau_end, (int, float)) or not 0 < tau_end < math.inf:
            raise ValueError(
                f"A {self.kind} schedule needs tau_end, a finite temperature > 0 (small values approach the "
                f"plain gradient), got {tau_end!r}."
            )
        if self.start is not None:
            _check_count("start", self.start, self.warmup)
        if self.stop is not None:
            _check_count("stop", self.stop, 0)
            if self.stop <= self.first:
                raise ValueError(
                    f"The temperature schedule ends (stop={self.stop}) before it starts (start={self.first}, "
                    f"in {self.unit}s): stop must be greater than start."
                )

    @classmethod
    def coerce(cls, spec: "TemperatureSchedule | Mapping[str, Any] | None") -> "TemperatureSchedule":
        """A schedule from itself, a dict of its fields (as YAML gives it), or ``None`` (constant)."""
        if spec is None:
            return cls()
        if isinstance(spec, TemperatureSchedule):
            return spec
        if not isinstance(spec, Mapping):
            raise TypeError(
                f"A temperature schedule must be a TemperatureSchedule or a dict of its fields, got {type(spec).__name__}."
            )
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - valid)
        if unknown:
            raise ValueError(f"Unknown temperature schedule setting(s) {unknown}; valid settings are {sorted(valid)}.")
        return cls(**spec)

    @property
    def first(self) -> int:
        """The time annealing begins (``start``, or the end of the warm-up)."""
        return self.warmup if self.start is None else self.start

    @property
    def needs_stop(self) -> bool:
        """Whether ``stop`` still has to be filled in from the training length."""
        return self.kind != "constant" and self.stop is None

    def resolved(self, total: int) -> "TemperatureSchedule":
        """This schedule with a missing ``stop`` set to ``total`` (the training length in ``unit``s)."""
        if not self.needs_stop:
            return self
        if total <= self.first:
            raise ValueError(
                f"Training lasts {total} {self.unit}(s), but the temperature schedule only starts annealing at "
                f"{self.unit} {self.first}: set an explicit stop, an earlier start, or train longer."
            )
        return replace(self, stop=total)

    def tau(self, tau0: float, t: int) -> float | None:
        """The temperature at time ``t`` for a rule starting at ``tau0``; ``None`` means the rule is off."""
        if t < self.warmup:
            return tau0 * t / self.warmup if t > 0 else None
        if self.kind == "constant" or t < self.first:
            return tau0
        if self.stop is None:
            raise RuntimeError("This schedule's stop is not set yet: call resolved(total) first.")
        assert self.tau_end is not None  # checked in __post_init__
        progress = min(1.0, (t - self.first) / (self.stop - self.first))
        if self.kind == "linear":
            return tau0 + (self.tau_end - tau0) * progress
        return self.tau_end + (tau0 - self.tau_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class RuleSchedules:
    """Starting rules plus one schedule per tempered, active rule: ``SoftRules`` at any time."""

    base: SoftRules
    schedules: Mapping[str, TemperatureSchedule]

    @classmethod
    def create(
        cls,
        temperatures: Mapping[str, Any] | None = None,
        schedule: TemperatureSchedule | Mapping[str, Any] | None = None,
        rule_schedules: Mapping[str, TemperatureSchedule | Mapping[str, Any]] | None = None,
        *,
        maxpool_padding: MaxPoolPadding = "neginf",
        warn_uncovered: bool = True,
    ) -> "RuleSchedules":
        """Validate everything now: rule names, temperatures, schedules and per-rule overrides.

        ``schedule`` applies to every tempered rule that is on; ``rule_schedules``
        replaces it for the rules it names. Untempered rules (the norms) stay as
        ``temperatures`` sets them for the whole run.
        """
        base = SoftRules.create(temperatures, maxpool_padding=maxpool_padding, warn_uncovered=warn_uncovered)
        default = TemperatureSchedule.coerce(schedule)
        if rule_schedules is not None and not isinstance(rule_schedules, Mapping):
            raise TypeError(
                f"rule_schedules must be a dict of rule name -> schedule, got {type(rule_schedules).__name__}."
            )
        overrides = dict(rule_schedules or {})
        for name in overrides:
            if name not in base.temperatures:
                raise ValueError(f"Unknown soft rule name {name!r} in rule_schedules; valid names are {sorted(base.temperatures)}.")
            if name in UNTEMPERED_RULES:
                raise ValueError(f"Rule {name!r} has no temperature, so it cannot have a schedule; remove it from rule_schedules.")
            if base.tau(name) is None:
                raise ValueError(
                    f"Rule {name!r} is switched off in temperatures, so its schedule would never apply; "
                    "give it a starting temperature or remove it from rule_schedules."
                )
        schedules = {
            name: TemperatureSchedule.coerce(overrides.get(name, default))
            for name, tau in base.temperatures.items()
            if tau is not None and name not in UNTEMPERED_RULES
        }
        return cls(base, schedules)

    @property
    def is_constant(self) -> bool:
        """Whether the rules never change (no annealing, no warm-up)."""
        return all(s.kind == "constant" and s.warmup == 0 for s in self.schedules.values())

    @property
    def changes_every_step(self) -> bool:
        """Whether some temperature can change from one optimizer step to the next."""
        return any(s.unit == "step" and not (s.kind == "constant" and s.warmup == 0) for s in self.schedules.values())

    def units_needing_stop(self) -> set[str]:
        """The units (``"step"``/``"epoch"``) whose training length is needed to fill in a ``stop``."""
        return {s.unit for s in self.schedules.values() if s.needs_stop}

    def resolved(self, totals: Mapping[str, int]) -> "RuleSchedules":
        """Fill every missing ``stop`` from ``totals`` (unit -> training length in that unit)."""
        return replace(
            self, schedules={n: s.resolved(totals[s.unit]) if s.needs_stop else s for n, s in self.schedules.items()}
        )

    def temperatures_at(self, step: int, epoch: int) -> dict[str, float | None]:
        """Scheduled rule -> temperature (``None``: off) after ``step`` optimizer steps in epoch ``epoch``."""
        out: dict[str, float | None] = {}
        for name, sched in self.schedules.items():
            tau0 = self.base.tau(name)
            assert isinstance(tau0, float)  # only tempered, active rules are scheduled
            out[name] = sched.tau(tau0, step if sched.unit == "step" else epoch)
        return out

    def rules_at(self, step: int, epoch: int) -> SoftRules:
        """The ``SoftRules`` to train with after ``step`` optimizer steps in epoch ``epoch``."""
        return replace(self.base, temperatures={**self.base.temperatures, **self.temperatures_at(step, epoch)})

    def config(self) -> dict[str, Any]:
        """Plain-data description (for checkpoints and comparisons)."""
        return {
            "temperatures": dict(self.base.temperatures),
            "maxpool_padding": self.base.maxpool_padding,
            "schedules": {name: asdict(s) for name, s in self.schedules.items()},
        }
