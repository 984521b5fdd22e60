"""Rebuild a trained model from its run directory alone (export and eval need no training process).

The run directory holds the resolved config and the adapters, not the residual: the residual is recomputed from
the base model with the same deterministic init (seeded), then the trained adapters are loaded over it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from forge_mlx.adapters import adapter_weights, load_adapter_weights
from forge_mlx.checkpoint import latest_good
from forge_mlx.config import Config, load_config
from forge_mlx.errors import ForgeError
from forge_mlx.models import load_model
from forge_mlx.pipeline import ADAPTER_CONFIG, FINAL_ADAPTERS, INIT_ADAPTERS, RESOLVED_CONFIG, adapt


def run_config(run_dir: str | Path) -> Config:
    path = Path(run_dir) / RESOLVED_CONFIG
    if not path.exists():
        raise ForgeError("not a forge-mlx run directory (no config.yaml)", where=str(run_dir))
    return load_config(path)


def adapter_meta(run_dir: str | Path) -> dict:
    path = Path(run_dir) / ADAPTER_CONFIG
    if not path.exists():
        raise ForgeError("the run has no adapter_config.json", where=str(run_dir))
    return json.loads(path.read_text(encoding="utf-8"))


def trained_adapters_file(run_dir: str | Path) -> Path:
    """The final adapters, or the newest good checkpoint's when the run stopped early."""
    run_dir = Path(run_dir)
    if (run_dir / FINAL_ADAPTERS).exists():
        return run_dir / FINAL_ADAPTERS
    path, _ = latest_good(run_dir)
    if path is None:
        raise ForgeError("the run directory holds no adapters (no adapters.safetensors, no checkpoint)",
                         where=str(run_dir), hint="train first, or point at a finished run")
    return path / "adapters.safetensors"


def load_run(run_dir: str | Path, *, dtype: str | None = None, adapters: str = "trained", log=lambda *a: None):
    """(model, tokenizer, config, meta) with the run's adapters over its residual; adapters="init" loads the
    PiSSA starting point instead (the same function as the base model up to the residual's quantization)."""
    config = run_config(run_dir)
    meta = adapter_meta(run_dir)
    model, tokenizer, _ = load_model(config.model, dtype or config.dtype)
    adapt(model, config, log)
    file = Path(run_dir) / INIT_ADAPTERS if adapters == "init" else trained_adapters_file(run_dir)
    load_adapter_weights(model, mx.load(str(file)))
    mx.eval(adapter_weights(model))
    model.eval()
    return model, tokenizer, config, meta
