"""A PEFT LoRA adapter (adapter_model.safetensors + adapter_config.json) that PEFT loads on the original base.

PEFT computes W + (lora_alpha / r) * lora_B.weight @ lora_A.weight with lora_A.weight (r, in) = lora_a.T and
lora_B.weight (out, r) = lora_b.T. Like PEFT's own PiSSA conversion (save_pretrained with
path_initial_model_for_weight_conversion: r *= 2, lora_alpha *= 2), alpha / r is kept at the run's scale.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx

from forge_mlx.export.convert import LoraFactors, most_common

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model


def peft_weights(factors: dict[str, LoraFactors], dtype: mx.Dtype) -> dict[str, mx.array]:
    weights = {}
    for path, f in factors.items():
        weights[f"{PREFIX}{path}.lora_A.weight"] = f.lora_a.T.astype(dtype)  # (R, in)
        weights[f"{PREFIX}{path}.lora_B.weight"] = f.lora_b.T.astype(dtype)  # (out, R)
    return weights


def peft_config(factors: dict[str, LoraFactors], base_model: str) -> dict:
    """LoraConfig fields: the most common rank and alpha, per-layer exceptions in rank_pattern / alpha_pattern
    (keys are full module paths, which PEFT matches as a dotted suffix)."""
    ranks = {path: f.rank for path, f in factors.items()}
    alphas = {path: _number(f.scale * f.rank) for path, f in factors.items()}
    r, alpha = most_common(ranks.values()), most_common(alphas.values())
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted({path.rsplit(".", 1)[-1] for path in factors}),
        "rank_pattern": {p: v for p, v in ranks.items() if v != r},
        "alpha_pattern": {p: v for p, v in alphas.items() if v != alpha},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def export_peft(factors: dict[str, LoraFactors], base_model: str, out: Path, dtype: str) -> list[str]:
    mx.save_safetensors(str(out / WEIGHTS_FILE), peft_weights(factors, getattr(mx, dtype)), metadata={"format": "pt"})
    (out / CONFIG_FILE).write_text(json.dumps(peft_config(factors, base_model), indent=2) + "\n", encoding="utf-8")
    return [WEIGHTS_FILE, CONFIG_FILE]


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
