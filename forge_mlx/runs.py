"""Rebuild a trained model from its run directory alone (export and eval need no training process).

The run directory holds the resolved config and the adapters, not the residual: the residual is recomputed from
the base model with the same deterministic init (seeded), then the trained adapters are loaded over it.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from forge_mlx.adapters import adapter_weights, load_adapter_weights
from forge_mlx.models import load_model
from forge_mlx.pipeline import adapt
from forge_mlx.run_files import INIT_ADAPTERS, adapter_meta, run_config, trained_adapters_file


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
