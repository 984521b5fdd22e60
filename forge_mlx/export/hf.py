"""Merged Hugging Face export: W = dequant(residual) + scale * (lora_a @ lora_b).T per adapted layer, every
other weight as the trained model computes it, under the base checkpoint's key names, sharded as transformers
does."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten
from safetensors import safe_open

from forge_mlx.adapters import fuse_adapters
from forge_mlx.errors import ForgeError
from forge_mlx.quant import NF4Linear, dequantize_residual

EXPORT_DTYPES = ("float16", "bfloat16", "float32")
# What a model folder needs besides weights and config.json; copied from the base as they are.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "*.tiktoken",
    "generation_config.json",
)
QUANTIZATION_KEYS = ("quantization", "quantization_config")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def parse_size(text: str) -> int:
    """'5GB' -> 5 * 10**9 bytes (transformers' units: KB/MB/GB are decimal, KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else None
    if unit not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise ForgeError(f"shard size '{text}' is not a size", where="--shard-size", hint="e.g. 5GB, 500MB, 2GiB")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


def dense_weights(model: nn.Module, dtype: mx.Dtype) -> dict[str, mx.array]:
    """Every parameter as the trained model computes it: adapters merged in fp32, 4-bit layers dequantized.

    Mutates `model` (each layer becomes a plain nn.Linear / nn.Embedding); values are cast to `dtype`.
    """
    from mlx_lm.utils import dequantize_model

    fuse_adapters(model, mx.float32)
    dense = [(path, _dense_linear(m)) for path, m in model.named_modules() if isinstance(m, NF4Linear)]
    if dense:
        model.update_modules(tree_unflatten(dense))
    dequantize_model(model)
    weights = {k: v.astype(dtype) for k, v in tree_flatten(model.parameters())}
    mx.eval(weights)
    return weights


def _dense_linear(module: nn.Module) -> nn.Linear:
    weight = dequantize_residual(module)  # (out, in) fp32, the exact 4-bit values
    bias = module.get("bias")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    linear.weight = weight
    if bias is not None:
        linear.bias = bias
    return linear


def base_weight_files(base_dir: Path) -> list[Path]:
    return sorted(base_dir.glob("model*.safetensors"))


def match_base_names(weights: dict[str, mx.array], base_dir: Path, dtype: mx.Dtype, log=print) -> dict[str, mx.array]:
    """The weights under the base checkpoint's key set: keys mlx-lm's sanitize dropped (a tied lm_head, rotary
    buffers) come back verbatim from the base file; quantization companions (.scales/.biases) are left out."""
    out = dict(weights)
    for file in base_weight_files(base_dir):
        with safe_open(str(file), framework="numpy") as handle:
            for key in handle.keys():
                tensor = handle.get_slice(key)
                floating = tensor.get_dtype() in ("F16", "BF16", "F32", "F64")
                if key in out:
                    if floating and tuple(tensor.get_shape()) != tuple(out[key].shape):
                        raise ForgeError(
                            f"'{key}' has shape {tuple(out[key].shape)} in mlx-lm but "
                            f"{tuple(tensor.get_shape())} in the base checkpoint",
                            where=str(file),
                            hint="mlx-lm re-lays this architecture's weights; use --format peft or mlx-lm",
                        )
                elif _is_companion(key, out):
                    continue
                elif floating:
                    out[key] = mx.load(str(file))[key].astype(dtype)
                    log(f"  {key}: not a model parameter in mlx-lm, copied from the base")
                else:
                    log(f"  {key}: quantized in the base and not a model parameter, left out")
    return out


def _is_companion(key: str, weights: dict) -> bool:
    """mlx affine quantization's per-group scales/biases of a weight that is now dense."""
    stem, leaf = key.rsplit(".", 1) if "." in key else ("", key)
    return leaf in ("scales", "biases") and f"{stem}.weight" in weights


def write_safetensors(weights: dict[str, mx.array], out: Path, shard_bytes: int) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + an index past `shard_bytes`; returns names."""
    shards: list[dict[str, mx.array]] = [{}]
    size = 0
    for key in sorted(weights):
        nbytes = weights[key].nbytes
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = weights[key]
        size += nbytes
    if len(shards) == 1:
        mx.save_safetensors(str(out / SINGLE_FILE), shards[0], metadata={"format": "pt"})
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        mx.save_safetensors(str(out / name), shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    index = {"metadata": {"total_size": sum(v.nbytes for v in weights.values())}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
    return [*names, INDEX_FILE]


def base_dtype(base_dir: Path) -> str:
    """The base checkpoint's dtype (config.json torch_dtype / dtype); float32 when it names none we write."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    dtype = config.get("torch_dtype") or config.get("dtype")
    return dtype if dtype in EXPORT_DTYPES else "float32"


def write_config(base_dir: Path, out: Path, dtype: str) -> None:
    """The base's config.json without any quantization block, its dtype set to the export's."""
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    for key in QUANTIZATION_KEYS:
        config.pop(key, None)
    config["torch_dtype"] = dtype
    if "dtype" in config:
        config["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def copy_tokenizer_files(base_dir: Path, out: Path) -> list[str]:
    copied = sorted({p.name for pattern in TOKENIZER_FILES for p in base_dir.glob(pattern) if p.is_file()})
    for name in copied:
        shutil.copyfile(base_dir / name, out / name)
    return copied


def export_hf(model: nn.Module, base_dir: Path, out: Path, dtype: str, shard_bytes: int, log=print) -> list[str]:
    """Write the merged model into `out` (weights, config, tokenizer files); returns the files written."""
    weights = match_base_names(dense_weights(model, getattr(mx, dtype)), base_dir, getattr(mx, dtype), log)
    files = write_safetensors(weights, out, shard_bytes)
    write_config(base_dir, out, dtype)
    total = sum(v.nbytes for v in weights.values())
    log(f"  {len(weights)} tensors, {total / 1e6:.1f} MB as {dtype} in {len(files)} file(s)")
    return [*files, "config.json", *copy_tokenizer_files(base_dir, out)]
