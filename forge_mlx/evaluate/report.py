"""The comparison table (rows: measures, columns: models) as text, JSON, Markdown and a bar-chart PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

LABELS = {
    "loss": "loss (completion NLL / token)",
    "perplexity": "perplexity",
    "exact_match": "exact match",
    "preference_accuracy": "preference accuracy (logp chosen > rejected)",
    "logp_margin": "logp margin (chosen - rejected)",
    "reward_accuracy": "DPO reward accuracy (vs first column)",
    "reward_margin": "DPO reward margin (vs first column)",
}


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4g}"


def format_table(report: dict) -> str:
    """Markdown table of report["measures"]; with two models a last column gives second minus first."""
    labels = [m["label"] for m in report["models"]]
    delta = len(labels) == 2
    header = ["measure", *labels] + ([f"{labels[1]} - {labels[0]}"] if delta else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, values in report["measures"].items():
        row = [LABELS.get(name, name), *(_cell(values.get(label)) for label in labels)]
        if delta:
            a, b = (values.get(label) for label in labels)
            row.append(_cell(b - a if a is not None and b is not None else None))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    """The table plus what each column is and what each measure was computed on."""
    lines = ["# forge-mlx evaluation", ""]
    lines += [f"- **{m['label']}**: {m['description']}" for m in report["models"]]
    lines += ["", format_table(report), ""]
    lines += [f"- {name}: {note}" for name, note in report.get("notes", {}).items()]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, out_png: str | Path) -> Path | None:
    """One bar panel per measure (scales differ), one bar per model; None when there is nothing to draw."""
    measures = {k: v for k, v in report["measures"].items() if any(_finite(x) for x in v.values())}
    if not measures:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [m["label"] for m in report["models"]]
    fig, axes = plt.subplots(1, len(measures), figsize=(3.2 * len(measures), 3.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], measures.items(), strict=True):
        heights = [values.get(label) if _finite(values.get(label)) else 0.0 for label in labels]
        bars = ax.bar(labels, heights, color=[f"C{i}" for i in range(len(labels))])
        ax.bar_label(bars, labels=[_cell(values.get(label)) for label in labels], fontsize=8)
        ax.set_title(name.replace("_", " "), fontsize=10)
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)


def write_report(report: dict, json_path: str | Path) -> dict[str, Path]:
    """Write JSON, Markdown and PNG side by side (report.json, report.md, report.png); returns their paths."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    paths = {"json": json_path, "markdown": json_path.with_suffix(".md")}
    paths["json"].write_text(json.dumps(report, indent=1, default=_json_default), encoding="utf-8")
    paths["markdown"].write_text(format_markdown(report), encoding="utf-8")
    png = plot_report(report, json_path.with_suffix(".png"))
    if png is not None:
        paths["png"] = png
    return paths


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _json_default(value):
    return float(value) if hasattr(value, "__float__") else str(value)
