"""Find and load a Hugging Face causal LM with mlx-lm: a local folder or a hub id; safetensors only, no remote code."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from forge_mlx.errors import ForgeError
from forge_mlx.model_files import read_model_config, resolve_model_path


def check_model_folder(path: Path) -> dict:
    """config.json of a folder we will load (model_files' checks) whose architecture mlx-lm knows."""
    config = read_model_config(path)
    try:
        from mlx_lm.utils import _get_classes

        _get_classes(config)
    except ValueError:
        raise ForgeError(
            f"architecture '{config['model_type']}' is not supported by mlx-lm",
            where=f"{path / 'config.json'}: field 'model_type'",
        ) from None
    return config


def on_gpu() -> bool:
    return mx.default_device() == mx.gpu


def compute_dtype(setting: str = "auto") -> mx.Dtype:
    """fp32 on CPU (bf16 matmul is not BLAS-backed there and runs far slower), bf16 on Metal/CUDA."""
    if setting == "auto":
        return mx.bfloat16 if on_gpu() else mx.float32
    return getattr(mx, setting)


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating parameters (not packed quantized integers) to the compute dtype."""
    from mlx.utils import tree_map

    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))


def load_model(name: str, dtype: str = "auto"):
    """Load (model, tokenizer, config) through mlx-lm, weights cast to the compute dtype."""
    from mlx_lm.utils import load_model as mlx_load_model
    from mlx_lm.utils import load_tokenizer

    path = resolve_model_path(name)
    check_model_folder(path)
    try:  # mlx-lm reports a truncated file, a config/weights mismatch or a missing key in several types
        model, config = mlx_load_model(path, lazy=False)
    except (RuntimeError, ValueError, TypeError, KeyError) as exc:
        raise ForgeError(
            f"cannot load the model: {_one_line(exc)}",
            where=str(path),
            hint="config.json and the *.safetensors must match and be complete; re-download or re-convert the model",
        ) from exc
    cast_floats(model, compute_dtype(dtype))
    try:
        tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ForgeError(
            f"cannot load the tokenizer: {_one_line(exc)}",
            where=str(path),
            hint="the folder needs tokenizer.json (or tokenizer.model) and tokenizer_config.json",
        ) from exc
    return model, tokenizer, config


def _one_line(exc: Exception, limit: int = 300) -> str:
    """A library's (often multi-line) message as one line, for the one-line CLI error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def device_memory_bytes() -> int:
    """Memory the model can use: Metal's recommended working set on a Mac, else physical RAM."""
    info = mx.device_info()
    if "max_recommended_working_set_size" in info:
        return int(info["max_recommended_working_set_size"])
    if "memory_size" in info:
        return int(info["memory_size"])
    if sys.platform.startswith("linux"):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0
