"""``sp-lightning evaluate``: the paper's table of explanation-quality scores for a trained checkpoint.

:mod:`.rows` picks the explainers (the paper's rows), :mod:`.table` holds and writes the
table, :mod:`.run` is the command. This package sits above the explainers, metrics and
probe packages and below the CLI.
"""

from .rows import default_explainers
from .table import EvaluationTable, Score

__all__ = ["EvaluationTable", "Score", "default_explainers"]
