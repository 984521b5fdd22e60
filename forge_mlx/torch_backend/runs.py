"""Rebuild a trained torch model from a run directory alone (either backend's run: the files are the same).

The residual is recomputed from the base model with the run's deterministic init, then the adapters are
loaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.numpy import load_file

from forge_mlx.run_files import INIT_ADAPTERS, adapter_meta, run_config, trained_adapters_file
from forge_mlx.torch_backend.adapters import load_adapter_weights
from forge_mlx.torch_backend.device import pick_device
from forge_mlx.torch_backend.pipeline import adapt, load_model


def load_run(
    run_dir: str | Path,
    *,
    dtype: str | None = None,
    adapters: str = "trained",
    device: torch.device | str | None = None,
    log=lambda *a: None,
):
    """(model, tokenizer, config, meta) with the run's adapters over its residual, in eval mode;
    adapters="init" loads the PiSSA starting point instead."""
    config = run_config(run_dir)
    meta = adapter_meta(run_dir)
    device = pick_device(str(device)) if device is not None else None
    model, tokenizer, _, device = load_model(config.model, dtype or config.dtype, device)
    adapt(model, config, device, log)
    file = Path(run_dir) / INIT_ADAPTERS if adapters == "init" else trained_adapters_file(run_dir)
    load_adapter_weights(model, load_file(str(file)))
    model.eval()
    return model, tokenizer, config, meta
