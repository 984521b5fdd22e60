"""Data-parallel training on MLX's distributed layer: `mlx.launch -n 2 --backend ring` on localhost (two CPU
processes) reproduces a single-process run with the same global batch, and only rank 0 writes."""

import subprocess
import sys
from pathlib import Path

import helpers
import pytest

from forge_mlx.config import save_config
from forge_mlx.metrics_log import read_metrics
from forge_mlx.pipeline import run_training

LAUNCH = Path(sys.executable).with_name("mlx.launch")
SCRIPT = """
import sys
import forge_mlx
from forge_mlx.config import load_config
from forge_mlx.pipeline import run_training
run_training(load_config(sys.argv[1]))
"""
# Each rank sums its rows' token-weighted gradients and losses and all_sum adds the two partial sums: the same
# numbers as one process, up to fp32 summation order (~1e-7 relative per step, compounding over 8 Adam steps).
LOSS_RTOL = 1e-4


@pytest.mark.slow
@pytest.mark.skipif(not LAUNCH.exists(), reason="mlx.launch not installed")
def test_two_ring_processes_match_one_process(tmp_path):
    settings = ("train.steps=8", "train.batch_size=4", "train.save_every=4", "dpo.enabled=false")
    single = helpers.tiny_config(tmp_path, "single", *settings)
    run_training(single, log=helpers.quiet)
    config = helpers.tiny_config(tmp_path, "ring", *settings)
    config_file = tmp_path / "ring.yaml"
    save_config(config, config_file)
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT, encoding="utf-8")
    done = subprocess.run(
        [
            str(LAUNCH),
            "-n",
            "2",
            "--backend",
            "ring",
            "--python",
            sys.executable,
            str(script),
            str(config_file),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).parent.parent,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ring, one = helpers.losses(tmp_path / "ring"), helpers.losses(tmp_path / "single")
    assert sorted(ring) == list(range(1, 9))
    assert max(abs(ring[s] - one[s]) / abs(one[s]) for s in one) < LOSS_RTOL
    # rank 0 alone wrote: one record per step, one set of checkpoints, the final adapters
    steps = [r["step"] for r in read_metrics(tmp_path / "ring" / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, 9))
    assert sorted(p.name for p in (tmp_path / "ring" / "checkpoints").iterdir()) == [
        "sft-000004",
        "sft-000008",
    ]
    final = helpers.load_arrays(tmp_path / "ring" / "adapters.safetensors")
    assert helpers.max_abs_diff(final, helpers.load_arrays(tmp_path / "single" / "adapters.safetensors")) < 1e-4
    assert "data parallel over 2 processes" in done.stdout
