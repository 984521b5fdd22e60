"""Read a LoRA adapter trained elsewhere (a PEFT folder or an mlx-lm folder) as per-layer weight deltas, so a
run can merge it into the base (W + delta) and PiSSA-initialise from the merged model.

Framework-free (numpy only) so both backends share it. Paths are forge-mlx module paths from the model root
(model.layers.0.self_attn.q_proj). delta W (out, in) = scale * (lora_a @ lora_b).T, the LoRA paper's s * B A.
Only safetensors are read, by a small parser here (numpy has no bfloat16): a pickled adapter is refused.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from forge_mlx.errors import ForgeError
from forge_mlx.model_files import read_json_object

CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
MLX_LM_WEIGHTS = "adapters.safetensors"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
PEFT_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
MLX_LM_KEY = re.compile(r"(.+)\.lora_([ab])")
# PEFT inits that rewrite the base weights: the saved factors are relative to a base nobody else has.
PEFT_MUTATING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# LoraConfig fields that change the layer's function beyond W + s B A (PEFT tags them is_lora_variant).
PEFT_VARIANTS = (
    "use_dora",
    "use_qalora",
    "use_bdlora",
    "alora_invocation_tokens",
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "kasa_config",
    "layer_replication",
    "lora_bias",
    "target_parameters",
)
SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}  # BF16: raw bits, widened below


@dataclass(frozen=True)
class LayerDelta:
    """One layer's imported LoRA in forge-mlx layout; `key` is the tensor name in the file (for messages)."""

    lora_a: np.ndarray  # (in, r) float32
    lora_b: np.ndarray  # (r, out) float32
    scale: float
    key: str

    def delta(self) -> np.ndarray:
        """scale * (lora_a @ lora_b).T: the (out, in) change to W, in float32."""
        return np.float32(self.scale) * (self.lora_a @ self.lora_b).T


@dataclass(frozen=True)
class ImportedAdapter:
    kind: str  # "peft" or "mlx-lm"
    path: Path
    layers: dict[str, LayerDelta]


def read_adapter(path: str | Path) -> ImportedAdapter:
    """A PEFT (peft_type LORA) or mlx-lm (fine_tune_type lora) adapter folder; anything else is a ForgeError."""
    folder = Path(path).expanduser()
    if folder.is_file():
        if any(folder.match(p) for p in PICKLED):
            raise _pickled(folder)
        raise ForgeError("an adapter is a folder, not a file", where=str(folder), hint="pass the folder that holds it")
    if not folder.is_dir():
        raise ForgeError("adapter folder not found", where=str(folder))
    config = read_json_object(folder / CONFIG_FILE, "not an adapter folder")
    if "peft_type" in config:
        return ImportedAdapter("peft", folder, _peft_layers(folder, config))
    if "fine_tune_type" in config or "lora_parameters" in config:
        return ImportedAdapter("mlx-lm", folder, _mlx_lm_layers(folder, config))
    raise ForgeError(
        "not a PEFT or mlx-lm adapter config (no 'peft_type', 'fine_tune_type' or 'lora_parameters')",
        where=str(folder / CONFIG_FILE),
    )


def check_layers(adapter: ImportedAdapter, shapes: Mapping[str, tuple[int, int]]) -> None:
    """Every adapter layer must be a linear layer of the model (`shapes`: path -> (out, in)) of its shape."""
    example = next(iter(shapes), "model.layers.0.self_attn.q_proj")
    for path, layer in adapter.layers.items():
        if path not in shapes:
            raise ForgeError(
                f"adapter tensor '{layer.key}' is for '{path}', which is not a linear layer of this model",
                where=str(adapter.path),
                hint=f"this model's linear layers are named like '{example}': was the adapter trained on another base?",
            )
        shape = (layer.lora_b.shape[1], layer.lora_a.shape[0])
        if tuple(shapes[path]) != shape:
            raise ForgeError(
                f"adapter tensor '{layer.key}' makes a {shape} delta but '{path}' is {tuple(shapes[path])}",
                where=str(adapter.path),
                hint="the adapter was trained on a different base model",
            )


def merged_weight(weight: np.ndarray, layer: LayerDelta) -> np.ndarray:
    """W + delta in float32 ((out, in)), as PEFT's merge_and_unload and mlx-lm's fuse compute it."""
    return np.asarray(weight, np.float32) + layer.delta()


def _peft_layers(folder: Path, config: dict) -> dict[str, LayerDelta]:
    where = str(folder / CONFIG_FILE)
    if config["peft_type"] != "LORA":
        raise ForgeError(f"peft_type '{config['peft_type']}' is not LoRA", where=where, hint="only LoRA adapters merge")
    for name in PEFT_VARIANTS:
        if config.get(name):
            raise ForgeError(
                f"'{name}' is set: this adapter is not a plain LoRA (W + s B A), so it cannot be merged",
                where=where,
                hint="merge it with PEFT (merge_and_unload) and start from the merged model instead",
            )
    if config.get("bias", "none") != "none":
        raise ForgeError(f"bias '{config['bias']}': the adapter trains biases", where=where, hint="use bias 'none'")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(PEFT_MUTATING_INITS):
        raise ForgeError(
            f"init_lora_weights '{init}' rewrote the base weights, so these factors only fit that rewritten base",
            where=where,
            hint="save it with PEFT's path_initial_model_for_weight_conversion (a LoRA on the original base)",
        )
    pairs = _pairs(_weights_file(folder, PEFT_WEIGHTS), PEFT_KEY, "lora_A/lora_B weights of linear layers")
    layers = {}
    for path, (key, a, b) in pairs.items():  # a: lora_A.weight (r, in), b: lora_B.weight (out, r)
        r = _pattern(config, "rank_pattern", path, "r", 8)
        alpha = _pattern(config, "alpha_pattern", path, "lora_alpha", 8)
        if a.shape[0] != r or b.shape[1] != r:
            raise ForgeError(f"tensor '{key}' has rank {a.shape[0]}, the config says {r}", where=where)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        layers[path] = LayerDelta(a.T, b.T, float(scale), key)
    return layers


def _pattern(config: dict, field: str, path: str, default_field: str, default: float) -> float:
    """PEFT's get_pattern_key: the first pattern key that matches the path as a regex on a dotted suffix."""
    pattern = config.get(field) or {}
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return config.get(default_field, default)


def _mlx_lm_layers(folder: Path, config: dict) -> dict[str, LayerDelta]:
    where = str(folder / CONFIG_FILE)
    kind = "dora" if config.get("use_dora") else config.get("fine_tune_type", "lora")
    if kind != "lora":
        raise ForgeError(
            f"fine_tune_type '{kind}' is not a LoRA adapter, so it cannot be merged",
            where=where,
            hint="fuse it with `mlx_lm.fuse` and start from the fused model instead",
        )
    params = config.get("lora_parameters")
    if not isinstance(params, dict) or not isinstance(params.get("scale"), (int, float)):
        raise ForgeError("lora_parameters.scale (a number) is missing", where=where)
    pairs = _pairs(_weights_file(folder, MLX_LM_WEIGHTS), MLX_LM_KEY, "lora_a/lora_b of linear layers")
    for key, a, b in pairs.values():  # a: lora_a (in, r), b: lora_b (r, out)
        if a.shape[1] != b.shape[0]:
            raise ForgeError(f"tensor '{key}' has rank {a.shape[1]}, its lora_b {b.shape[0]}", where=where)
    return {path: LayerDelta(a, b, float(params["scale"]), key) for path, (key, a, b) in pairs.items()}


def _pairs(file: Path, key_pattern: re.Pattern, expected: str) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """path -> (A's key, factor A, factor B) from the tensors named <path>.<A or B>, which must all be factors."""
    found: dict[str, dict[str, tuple[str, np.ndarray]]] = {}
    for key, array in read_safetensors(file).items():
        match = key_pattern.fullmatch(key)
        if match is None:
            raise ForgeError(
                f"tensor '{key}' is not a LoRA factor",
                where=str(file),
                hint=f"forge-mlx imports {expected} only (no DoRA magnitudes, embeddings, biases or full modules)",
            )
        if array.ndim != 2 or not np.isfinite(array).all():
            raise ForgeError(f"tensor '{key}' must be a finite matrix, its shape is {array.shape}", where=str(file))
        found.setdefault(match.group(1), {})[match.group(2).upper()] = (key, array)
    pairs = {}
    for path, factors in sorted(found.items()):
        if len(factors) != 2:
            key = next(iter(factors.values()))[0]
            raise ForgeError(f"tensor '{key}' has no partner factor (A and B come in pairs)", where=str(file))
        (key, a), (_, b) = factors["A"], factors["B"]
        pairs[path] = (key, a, b)
    return pairs


def _weights_file(folder: Path, name: str) -> Path:
    if (folder / name).is_file():
        return folder / name
    pickled = sorted(p.name for pattern in PICKLED for p in folder.glob(pattern))
    if pickled:
        raise _pickled(folder / pickled[0])
    raise ForgeError(f"no {name} in the adapter folder", where=str(folder))


def _pickled(file: Path) -> ForgeError:
    return ForgeError(
        "the adapter weights are pickled; forge-mlx never unpickles (it can run arbitrary code)",
        where=str(file),
        hint="re-save it as safetensors, e.g. PEFT's save_pretrained(safe_serialization=True)",
    )


def read_safetensors(file: Path) -> dict[str, np.ndarray]:
    """Float tensors of a safetensors file as float32 numpy (bfloat16 widened bit-exactly)."""
    data = Path(file).read_bytes()
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
    except (struct.error, ValueError):
        header = None
    if not isinstance(header, dict):
        raise ForgeError("not a safetensors file (bad header)", where=str(file))
    body = memoryview(data)[8 + size :]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ForgeError(f"tensor '{name}' has no header entry", where=str(file))
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        start, end = info.get("data_offsets", (0, -1))
        shape = tuple(info.get("shape", ()))
        if dtype is None:
            raise ForgeError(f"tensor '{name}' has dtype {info.get('dtype')}, not a float", where=str(file))
        if not 0 <= start <= end <= len(body) or end - start != math.prod(shape) * np.dtype(dtype).itemsize:
            raise ForgeError(f"tensor '{name}' lies outside the file (truncated?)", where=str(file))
        array = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[name] = array.astype(np.float32)
    return tensors
