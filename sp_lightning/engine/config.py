"""Which soft rules are on, at which temperature: one validated, immutable config.

Temperatures are keyed by plain rule-name strings so a YAML file can set them.
A temperature of ``None`` switches a rule off (hard, plain backward). Rules that
have no temperature (the normalisation rules) take ``True`` (on) or ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

#: Default temperature of every rule (docs/method.md section 2; the rules marked "ours"
#: extend the same pattern to gated layers the paper does not cover).
DEFAULT_TEMPERATURES: dict[str, float | bool] = {
    "relu": 0.6,
    "leaky_relu": 0.6,  # ours: same hard gate as ReLU
    "hardtanh": 0.6,  # ours: ReLU6 / hardtanh, two ReLU-like gates
    "elu": 0.6,  # ours: ELU's branch gate
    "gelu": 1.0,
    "silu": 1.6,
    "mish": 1.6,  # ours: Mish's gate tanh(softplus(x)), softened like SiLU's
    "hardswish": 1.0,  # ours: Gaussian-smoothed hardsigmoid gate
    "hardsigmoid": 1.0,  # ours: Gaussian-smoothed clamp derivative
    "maxpool": 0.3,
    "attention": 1.0,
    "layernorm": True,
    "groupnorm": True,
    "rmsnorm": True,
}

#: Rules that hold statistics constant and take no temperature.
UNTEMPERED_RULES = frozenset({"layernorm", "groupnorm", "rmsnorm"})

MaxPoolPadding = Literal["neginf", "zeros"]


def _check_value(name: str, value: Any) -> float | bool | None:
    """Validate one rule's setting and return its canonical form."""
    if value is None or value is False:
        return None
    if name in UNTEMPERED_RULES:
        if value is True:
            return True
        raise ValueError(
            f"Rule {name!r} has no temperature: set it to True (on) or None (off), got {value!r}."
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(
            f"Temperature for rule {name!r} must be a positive number or None (rule off), got {value!r}."
        )
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(
            f"Temperature for rule {name!r} must be a finite number > 0 (or None to switch the rule off), "
            f"got {value!r}."
        )
    return float(value)


@dataclass(frozen=True)
class SoftRules:
    """Resolved soft-backward settings: per-rule temperatures plus options.

    Build it with :meth:`SoftRules.create`, which fills documented defaults for
    missing rules and rejects unknown names and non-positive temperatures.
    """

    temperatures: Mapping[str, float | bool | None] = field(default_factory=dict)
    maxpool_padding: MaxPoolPadding = "neginf"
    warn_uncovered: bool = True
    #: Whether rules with parameters (the norms) compute parameter gradients. Explainers switch
    #: it off: they only need input gradients, and a custom autograd Function cannot tell.
    param_grads: bool = True
    #: Whether each rule keeps what its backward derives from the forward (gates, max-pool window
    #: weights, softened attention) after the first backward through a graph, so that further
    #: backward passes (several targets) reuse it: faster, one such tensor per soft op held until
    #: the graph is freed. Explainers switch it on when they pull back more than one target.
    keep_derived: bool = False

    @classmethod
    def create(
        cls,
        temperatures: Mapping[str, Any] | None = None,
        *,
        maxpool_padding: MaxPoolPadding = "neginf",
        warn_uncovered: bool = True,
    ) -> "SoftRules":
        """Validate user settings; unknown rule names are errors naming the valid ones."""
        if temperatures is not None and not isinstance(temperatures, Mapping):
            raise TypeError(
                f"temperatures must be a dict of rule name -> temperature, got {type(temperatures).__name__}."
            )
        given = dict(temperatures or {})
        unknown = sorted(set(given) - set(DEFAULT_TEMPERATURES))
        if unknown:
            raise ValueError(
                f"Unknown soft rule name(s) {unknown}; valid names are {sorted(DEFAULT_TEMPERATURES)}."
            )
        if maxpool_padding not in ("neginf", "zeros"):
            raise ValueError(
                f"maxpool_padding must be 'neginf' (exact max-pool semantics) or 'zeros' "
                f"(the reference code's compatibility mode), got {maxpool_padding!r}."
            )
        resolved = {name: _check_value(name, given.get(name, default)) for name, default in DEFAULT_TEMPERATURES.items()}
        return cls(resolved, maxpool_padding=maxpool_padding, warn_uncovered=bool(warn_uncovered))

    @classmethod
    def coerce(cls, temperatures: "Mapping[str, Any] | SoftRules | None" = None, **options: Any) -> "SoftRules":
        """The one way user settings become rules: a ``SoftRules`` as it is, else ``create(temperatures, **options)``.

        Options beside a ``SoftRules`` object are an error rather than silently dropped: the object
        already fixes them.
        """
        if isinstance(temperatures, SoftRules):
            if options:
                raise TypeError(
                    f"Got a SoftRules object and the options {sorted(options)}: set them inside the SoftRules "
                    "(SoftRules.create(..., option=...)) or pass a temperatures dict with the options as keywords."
                )
            return temperatures
        return cls.create(temperatures, **options)

    @classmethod
    def hard(cls) -> "SoftRules":
        """Every rule off: the plain gradient."""
        return cls.create({name: None for name in DEFAULT_TEMPERATURES})

    def tau(self, rule: str) -> float | bool | None:
        """The rule's temperature (``True`` for untempered rules), or ``None`` when it is off."""
        return self.temperatures.get(rule)

    @property
    def any_active(self) -> bool:
        """Whether at least one rule is on."""
        return any(v is not None for v in self.temperatures.values())
