"""An mlx-lm LoRA adapter folder (adapters.safetensors + adapter_config.json) for
`mlx_lm.load(base, adapter_path=DIR)` and `mlx_lm.generate --adapter-path DIR`.

mlx-lm's load_adapters gives every adapted layer one rank and one scale (lora_parameters). Layers of a smaller
rank are zero-padded to the largest, and a layer whose scale differs has the ratio folded into its lora_b: the
product, and so the function, is unchanged.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx

from forge_mlx.errors import ForgeError
from forge_mlx.export.convert import LoraFactors, most_common

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
BLOCK_PATH = re.compile(r"(?:.*\.)?layers\.(\d+)\.(.+)")


def block_key(path: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj'): mlx-lm's keys are relative to a block."""
    match = BLOCK_PATH.fullmatch(path)
    if match is None:
        raise ForgeError(f"'{path}' is not inside model.layers; mlx-lm adapters only cover transformer blocks")
    return int(match.group(1)), match.group(2)


def uniform_factors(factors: dict[str, LoraFactors], rank: int, scale: float) -> dict[str, mx.array]:
    """Each layer at `rank` and `scale`: lora_a zero-padded (in, rank), lora_b padded, x scale_l / scale."""
    weights = {}
    for path, f in factors.items():
        pad = rank - f.rank
        weights[f"{path}.lora_a"] = mx.pad(f.lora_a, [(0, 0), (0, pad)])  # (in, rank)
        weights[f"{path}.lora_b"] = mx.pad(f.lora_b * (f.scale / scale), [(0, pad), (0, 0)])  # (rank, out)
    return weights


def mlx_lm_config(factors: dict[str, LoraFactors], n_blocks: int, base_model: str) -> dict:
    """num_layers counts blocks from the last one down to the lowest adapted block, as mlx-lm's tuner does."""
    blocks, keys = zip(*(block_key(p) for p in factors), strict=True)
    return {
        "model": base_model,
        "fine_tune_type": "lora",
        "num_layers": n_blocks - min(blocks),
        "lora_parameters": {
            "rank": max(f.rank for f in factors.values()),
            "scale": most_common(f.scale for f in factors.values()),
            "dropout": 0.0,
            "keys": sorted(set(keys)),
        },
    }


def export_mlx_lm(factors: dict[str, LoraFactors], n_blocks: int, base_model: str, out: Path, dtype: str) -> list[str]:
    config = mlx_lm_config(factors, n_blocks, base_model)
    lora = config["lora_parameters"]
    weights = {
        k: v.astype(getattr(mx, dtype)) for k, v in uniform_factors(factors, lora["rank"], lora["scale"]).items()
    }
    mx.save_safetensors(str(out / WEIGHTS_FILE), weights, metadata={"format": "mlx"})
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return [WEIGHTS_FILE, CONFIG_FILE]
