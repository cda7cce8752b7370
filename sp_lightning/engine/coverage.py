"""Which gated ops a forward softened, and which ran with the plain backward."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor, nn

from .config import SoftRules
from .mode import CoverageRecorder, SoftBackwardMode
from .session import explaining


@dataclass(frozen=True)
class CoverageReport:
    """Counts per rule (or op name) from one forward pass.

    ``softened``: ops that got a soft rule; ``switched_off``: ops whose rule is
    set to ``None``; ``uncovered``: gated ops with no soft rule at all (among
    them every softmax whose output did not reach a value-transport product).
    """

    softened: dict[str, int]
    switched_off: dict[str, int]
    uncovered: dict[str, int]

    @property
    def clean(self) -> bool:
        """True when every gated op that ran had a soft rule (switched-off rules excepted)."""
        return not self.uncovered

    def __str__(self) -> str:
        lines = ["soft-backward coverage:"]
        for title, counts in (("softened", self.softened), ("rule off", self.switched_off), ("NO RULE", self.uncovered)):
            for name, count in sorted(counts.items()):
                lines.append(f"  {title:<9} {name:<40} x{count}")
        if len(lines) == 1:
            lines.append("  no gated ops ran")
        return "\n".join(lines)


def coverage_report(
    model: nn.Module,
    inputs: Tensor,
    temperatures: Mapping[str, Any] | SoftRules | None = None,
    **options: Any,
) -> CoverageReport:
    """Run one forward of ``model`` on ``inputs`` (eval mode, state restored) and report rule coverage.

    Args:
        model: the model to inspect.
        inputs: one batch, as the model takes it.
        temperatures: rule name -> temperature, or a ``SoftRules``; see ``soft_backward``.
        **options: engine options (e.g. ``maxpool_padding``), as for ``soft_backward``.
    """
    rules = SoftRules.coerce(temperatures, **options)
    recorder = CoverageRecorder()
    with explaining(model):
        leaf = inputs.detach().clone().requires_grad_(True)
        with SoftBackwardMode(replace(rules, warn_uncovered=False), recorder):
            model(leaf.clone())  # a copy: the model may edit its input in place
    return CoverageReport(dict(recorder.softened), dict(recorder.switched_off), dict(recorder.uncovered))
