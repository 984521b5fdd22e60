"""Evaluation measures and report writers, free of MLX so the torch backend can share them.

The MLX scoring and the `forge-mlx eval` driver live in forge_mlx.evaluate.suite (run_eval).
"""

from forge_mlx.evaluate.measures import (
    EXTRACTORS,
    completion_loss,
    exact_match,
    extract,
    matches,
    normalise,
    perplexity,
    preference_accuracy,
    preference_scores,
    reward_margins,
)
from forge_mlx.evaluate.report import format_markdown, format_table, plot_report, write_report

__all__ = [
    "EXTRACTORS",
    "completion_loss",
    "exact_match",
    "extract",
    "format_markdown",
    "format_table",
    "matches",
    "normalise",
    "perplexity",
    "plot_report",
    "preference_accuracy",
    "preference_scores",
    "reward_margins",
    "write_report",
]
