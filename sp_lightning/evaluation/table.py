"""The evaluation table: per explainer and metric, the mean +- std of the per-image scores, as CSV, Markdown and TensorBoard scalars.

NaN scores (undefined for an image, e.g. a constant attribution) are left out of the mean
and std and counted, so the table says how many images each cell averages.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Score:
    """One cell: mean and (population) standard deviation over ``count`` defined scores of ``total``."""

    mean: float
    std: float
    count: int
    total: int

    @classmethod
    def of(cls, scores: Tensor) -> Score:
        """The cell of per-image ``scores`` (1-D; NaN = undefined).

        Example:
            >>> Score.of(torch.tensor([1.0, 3.0, float("nan")]))
            Score(mean=2.0, std=1.0, count=2, total=3)
        """
        defined = scores[~torch.isnan(scores)].double()
        if not len(defined):
            return cls(math.nan, math.nan, 0, len(scores))
        return cls(float(defined.mean()), float(defined.std(correction=0)), len(defined), len(scores))

    def text(self) -> str:
        """``'0.389 ± 0.12'`` (three significant digits), ``'n/a'`` when no score is defined."""
        return "n/a" if self.count == 0 else f"{self.mean:.3g} ± {self.std:.3g}"


@dataclass(frozen=True)
class EvaluationTable:
    """Scores by explainer, then metric, and each metric's direction (``True``: higher is better).

    Args:
        scores: ``{explainer: {metric: Score}}``; every explainer has the same metrics, in column order.
        higher_is_better: ``{metric: bool}``.
        notes: lines printed under the table (settings, rows left out).
    """

    scores: Mapping[str, Mapping[str, Score]]
    higher_is_better: Mapping[str, bool]
    notes: tuple[str, ...] = ()

    @property
    def metrics(self) -> list[str]:
        return list(next(iter(self.scores.values())))

    def header(self, metric: str) -> str:
        return f"{metric} {'↑' if self.higher_is_better[metric] else '↓'}"

    def markdown(self) -> str:
        """A Markdown table (one row per explainer), then the notes and what the arrows mean."""
        lines = [
            "| explainer | " + " | ".join(self.header(m) for m in self.metrics) + " |",
            "|---" * (len(self.metrics) + 1) + "|",
        ]
        for name, row in self.scores.items():
            lines.append(f"| {name} | " + " | ".join(row[m].text() for m in self.metrics) + " |")
        cells = [score for row in self.scores.values() for score in row.values()]
        totals = sorted({score.total for score in cells})
        undefined = sum(score.total - score.count for score in cells)
        lines += ["", f"Mean ± std of the per-sample scores ({' or '.join(map(str, totals))} samples per cell"
                  + (f"; {undefined} undefined scores left out, see the counts in evaluation.csv" if undefined else "")
                  + "); ↑ higher is better, ↓ lower is better."]
        return "\n".join([*lines, *self.notes]) + "\n"

    def write_csv(self, path: str) -> None:
        """One line per explainer and metric: ``explainer, metric, mean, std, count, total, higher_is_better``."""
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["explainer", "metric", "mean", "std", "count", "total", "higher_is_better"])
            for name, row in self.scores.items():
                for metric, score in row.items():
                    writer.writerow([name, metric, score.mean, score.std, score.count, score.total,
                                     self.higher_is_better[metric]])

    def write(self, directory: str) -> None:
        """``evaluation.csv``, ``evaluation.md`` and TensorBoard events (under ``tensorboard/``) in ``directory``."""
        os.makedirs(directory, exist_ok=True)
        self.write_csv(os.path.join(directory, "evaluation.csv"))
        with open(os.path.join(directory, "evaluation.md"), "w", encoding="utf-8") as handle:
            handle.write(self.markdown())
        self.write_tensorboard(os.path.join(directory, "tensorboard"))

    def write_tensorboard(self, log_dir: str) -> None:
        """Scalars ``evaluation/<metric>/<explainer>`` (and ``.../std``) at step 0, the Markdown table as text."""
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir)
        try:
            for name, row in self.scores.items():
                for metric, score in row.items():
                    writer.add_scalar(f"evaluation/{metric}/{name}", score.mean, 0)
                    writer.add_scalar(f"evaluation/{metric}/{name}/std", score.std, 0)
            writer.add_text("evaluation", self.markdown(), 0)
        finally:
            writer.close()
