"""metrics.jsonl (one record per report, appended and flushed) and the loss-curve PNG drawn from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from forge_mlx import reporting


class MetricsLog:
    """Append-only JSON lines; each write is flushed and fsynced so a crash loses no reported record, then
    mirrored to any open reporting session (W&B)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        reporting.publish(record)


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash mid-write
    return records


def drop_metrics_after(path: Path, phase: str, step: int) -> None:
    """On resume, forget the records a crashed run wrote after its last checkpoint (they will be written again)."""
    order = ["sft", "dpo"]
    keep = [
        r
        for r in read_metrics(path)
        if order.index(r.get("phase", "sft")) < order.index(phase)
        or (r.get("phase") == phase and r.get("step", 0) <= step)
    ]
    if Path(path).exists():
        tmp = Path(path).with_name(f".{Path(path).name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in keep), encoding="utf-8")
        os.replace(tmp, path)


def plot_losses(metrics_path: Path, out_png: Path) -> Path | None:
    """Train and validation loss per phase against step; None when there is nothing to draw."""
    records = read_metrics(metrics_path)
    phases = sorted({r["phase"] for r in records if "phase" in r}, key=["sft", "dpo"].index)
    if not phases:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(phases), figsize=(6 * len(phases), 4), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        for key, style in (("loss", "-"), ("val_loss", "o--")):
            points = [(r["step"], r[key]) for r in records if r.get("phase") == phase and key in r]
            if points:
                ax.plot(*zip(*points), style, label=key.replace("_", " "))
        ax.set_title(phase.upper())
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return Path(out_png)
