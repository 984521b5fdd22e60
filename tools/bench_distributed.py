"""Data-parallel SFT on MLX's ring backend: tokens/s for 1 and 2 processes on this machine, and the bytes each step
sends (adapter gradients only), side by side in one run.

Run: .venv/bin/python tools/bench_distributed.py [--steps 12] [--config configs/demo.yaml]
Writes bench_results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import forge_mlx  # noqa: F401  (fast BLAS before mlx)
from forge_mlx.config import load_config, save_config
from forge_mlx.metrics_log import read_metrics

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = Path(sys.executable).with_name("mlx.launch")
SCRIPT = (
    "import sys, forge_mlx\nfrom forge_mlx.config import load_config\nfrom forge_mlx.pipeline import run_training\n"
)
SCRIPT += "run_training(load_config(sys.argv[1]))\n"


def run(config_file: Path, processes: int, script: Path) -> None:
    command = [sys.executable, str(script), str(config_file)]
    if processes > 1:
        command = [
            str(LAUNCH),
            "-n",
            str(processes),
            "--backend",
            "ring",
            "--python",
            sys.executable,
            str(script),
            str(config_file),
        ]
    subprocess.run(command, check=True, cwd=ROOT, capture_output=True, text=True)


def steady_tokens_per_s(run_dir: Path, skip: int) -> float:
    """Mean tokens/s over the reports after the first `skip` steps (compilation and warm-up)."""
    records = [r for r in read_metrics(run_dir / "metrics.jsonl") if "tokens_per_s" in r and r["step"] > skip]
    return sum(r["tokens_per_s"] for r in records) / max(len(records), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs/demo.yaml"))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default=str(ROOT / "bench_results/distributed.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="forge-dist-"))
    script = work / "train.py"
    script.write_text(SCRIPT, encoding="utf-8")
    results = {}
    for processes in (1, 2):
        run_dir = work / f"p{processes}"
        config = load_config(
            args.config,
            [
                f"output_dir={run_dir}",
                f"train.steps={args.steps}",
                "train.steps_per_report=1",
                "train.val_batches=0",
                "train.grad_accum=1",
                "train.batch_size=4",
                "dpo.enabled=false",
                f"train.save_every={args.steps}",
            ],
        )
        config_file = work / f"p{processes}.yaml"
        save_config(config, config_file)
        run(config_file, processes, script)
        meta = json.loads((run_dir / "adapter_config.json").read_text())
        results[processes] = {
            "tokens_per_s": steady_tokens_per_s(run_dir, skip=2),
            "adapter_parameters": meta["trainable_parameters"],
            "bytes_per_step_per_rank": meta["trainable_parameters"] * 4,  # one fp32 all_sum of the adapter grads
        }
    report = {
        "config": args.config,
        "steps": args.steps,
        "results": results,
        "speedup_2_over_1": results[2]["tokens_per_s"] / results[1]["tokens_per_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{'processes':>10} {'tokens/s':>10} {'all_sum MB/step':>16}")
    for processes, r in results.items():
        mb = r["bytes_per_step_per_rank"] / 1e6 if processes > 1 else 0
        print(f"{processes:>10} {r['tokens_per_s']:>10.1f} {mb:>16.1f}")
    print(f"2-process / 1-process tokens/s: {report['speedup_2_over_1']:.2f}x")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
