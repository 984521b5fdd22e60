"""Import a llama-architecture GGUF into a Hugging Face folder that mlx-lm and transformers both load.

The header (metadata, tensor table) is parsed here so every tensor's ggml type is checked before any data is
read; the data itself comes from `mx.load`, which hands Q4_0/Q4_1/Q8_0 back as MLX quantized triples.
"""

from __future__ import annotations

import json
import mmap
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import mlx.core as mx
import numpy as np

from forge_mlx.errors import ForgeError
from forge_mlx.gguf_tokenizer import write_tokenizer

MARKER = "forge_import.json"  # written last: its presence means the import finished

# ggml type ids (ggml.h); the first six are the ones this importer reads.
F32, F16, Q4_0, Q4_1, Q8_0, BF16 = 0, 1, 2, 3, 8, 30
GGML_TYPE_NAMES = {
    F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q8_0: "Q8_0", BF16: "BF16",
    6: "Q5_0", 7: "Q5_1", 9: "Q8_1", 10: "Q2_K", 11: "Q3_K", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S", 22: "IQ2_S",
    23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M", 34: "TQ1_0", 35: "TQ2_0",
    39: "MXFP4",
}  # fmt: skip
QUANT_BITS = {Q4_0: 4, Q4_1: 4, Q8_0: 8}  # MLX unpacks these with group size 32
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}

# GGUF tensor name -> HF LlamaForCausalLM name: whole names, then the blk.N.<part> parts
GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# metadata value type id -> struct format, for the fixed-size types
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9


class TensorInfo(NamedTuple):
    """One row of the tensor table: enough to check and map a tensor before reading it."""

    name: str
    shape: tuple[int, ...]  # row-major (torch/MLX) order: ggml's dims reversed
    ggml_type: int


class GGUFHeader(NamedTuple):
    """Everything before the tensor data."""

    metadata: dict[str, Any]
    tensors: list[TensorInfo]


class _Cursor:
    """A read position in the file's bytes; struct errors mean the file ended early."""

    def __init__(self, buf: mmap.mmap, pos: int):
        self.buf, self.pos = buf, pos

    def take(self, fmt: str) -> tuple:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def string(self) -> str:
        (length,) = self.take("Q")
        self.pos += length
        return self.buf[self.pos - length : self.pos].decode("utf-8")

    def value(self, value_type: int) -> Any:
        if value_type in SCALAR_FORMATS:
            return self.take(SCALAR_FORMATS[value_type])[0]
        if value_type == STRING:
            return self.string()
        if value_type == ARRAY:
            item_type, count = self.take("IQ")
            if item_type in SCALAR_FORMATS:
                return list(self.take(f"{count}{SCALAR_FORMATS[item_type]}"))
            return [self.value(item_type) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {value_type}")


def read_gguf_header(path: Path) -> GGUFHeader:
    """Metadata and tensor table of a GGUF (v2/v3) file, without reading tensor data."""
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise ForgeError(f"not a GGUF file: it starts with {magic!r}, not b'GGUF'", where=str(path))
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with buf:
        cursor = _Cursor(buf, 4)
        try:
            version, n_tensors, n_kv = cursor.take("IQQ")
            if version not in (2, 3):
                raise ValueError(f"GGUF version {version} (this reader handles 2 and 3)")
            metadata = {}
            for _ in range(n_kv):
                key = cursor.string()
                metadata[key] = cursor.value(cursor.take("I")[0])
            tensors = []
            for _ in range(n_tensors):
                name = cursor.string()
                (n_dims,) = cursor.take("I")
                dims = cursor.take(f"{n_dims}Q")
                ggml_type, _offset = cursor.take("IQ")
                tensors.append(TensorInfo(name, tuple(reversed(dims)), ggml_type))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ForgeError(f"unreadable GGUF header: {e}", where=str(path)) from e
    return GGUFHeader(metadata, tensors)


Array = TypeVar("Array", np.ndarray, mx.array)


def unpermute_qk(w: Array, n_head: int) -> Array:
    """Undo llama.cpp's `permute` of q (n_head) / k (n_head_kv) rows: back to HF's rotate-half order."""
    rows, rest = w.shape[0], w.shape[1:]  # (n_head * head_dim, in)
    w = w.reshape(n_head, rows // n_head // 2, 2, *rest)  # (heads, head_dim/2, 2, in): GGUF's pairs
    return w.swapaxes(1, 2).reshape(rows, *rest)  # (heads, 2, head_dim/2, in): HF's two halves


def hf_name(gguf_name: str) -> str | None:
    """The HF LlamaForCausalLM key of a GGUF tensor name; None when llama has no such tensor."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if match is None or match[2] not in LAYER_NAMES:
        return None
    return f"model.layers.{match[1]}.{LAYER_NAMES[match[2]]}.weight"


def _meta(metadata: dict[str, Any], key: str, path: Path) -> Any:
    if key not in metadata:
        raise ForgeError(f"GGUF metadata has no '{key}'", where=str(path))
    return metadata[key]


def _float32_value(x: float) -> float:
    """The shortest decimal of a float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def llama_config(metadata: dict[str, Any], vocab_size: int, tied: bool, dtype: str, path: Path) -> dict:
    """config.json for LlamaForCausalLM from llama.* metadata."""
    arch = "llama."
    n_head = _meta(metadata, arch + "attention.head_count", path)
    hidden = _meta(metadata, arch + "embedding_length", path)
    head_dim = metadata.get(arch + "attention.key_length", hidden // n_head)
    if metadata.get(arch + "rope.dimension_count", head_dim) != head_dim:
        raise ForgeError("partial rotary embeddings are not supported by LlamaForCausalLM", where=str(path))
    if metadata.get(arch + "rope.scaling.type", "none") != "none":
        raise ForgeError(f"rope scaling '{metadata[arch + 'rope.scaling.type']}' is not supported", where=str(path))
    token_ids = {
        f"{name}_token_id": metadata.get(f"tokenizer.ggml.{key}_token_id")
        for name, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))
    }
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _meta(metadata, arch + "feed_forward_length", path),
        "num_hidden_layers": _meta(metadata, arch + "block_count", path),
        "num_attention_heads": n_head,
        "num_key_value_heads": metadata.get(arch + "attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "max_position_embeddings": _meta(metadata, arch + "context_length", path),
        "rms_norm_eps": _float32_value(_meta(metadata, arch + "attention.layer_norm_rms_epsilon", path)),
        "rope_theta": _float32_value(metadata.get(arch + "rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        **token_ids,
    }


def check_tensors(header: GGUFHeader, path: Path) -> None:
    """Every tensor has a readable type and an HF name, and no llama tensor is missing."""
    for info in header.tensors:
        if info.ggml_type not in (F32, F16, BF16, *QUANT_BITS):
            type_name = GGML_TYPE_NAMES.get(info.ggml_type, f"ggml type {info.ggml_type}")
            raise ForgeError(
                f"tensor '{info.name}' has type {type_name}; supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0",
                where=str(path),
                hint="re-quantize the model to one of those with llama.cpp's llama-quantize",
            )
        if hf_name(info.name) is None:
            raise ForgeError(f"tensor '{info.name}' has no LlamaForCausalLM counterpart", where=str(path))
    n_layers = _meta(header.metadata, "llama.block_count", path)
    expected = {*GLOBAL_NAMES} - {"output.weight"}
    expected |= {f"blk.{i}.{part}.weight" for i in range(n_layers) for part in LAYER_NAMES}
    missing = sorted(expected - {info.name for info in header.tensors})
    if missing:
        raise ForgeError(f"GGUF lacks llama tensors: {', '.join(missing[:5])}", where=str(path))


def load_tensor(weights: dict[str, mx.array], info: TensorInfo, dtype: mx.Dtype) -> mx.array:
    """One tensor as floats: quantized triples dequantized in float32 so no rounding precedes the cast."""
    if info.ggml_type in QUANT_BITS:
        base = info.name.removesuffix(".weight")
        scales, biases = (weights[f"{base}.{part}"].astype(mx.float32) for part in ("scales", "biases"))
        w = mx.dequantize(weights[info.name], scales, biases, group_size=32, bits=QUANT_BITS[info.ggml_type])
    else:
        w = weights[info.name].astype(mx.float32)
    if tuple(w.shape) != info.shape:
        raise ForgeError(f"tensor '{info.name}' loaded as {tuple(w.shape)}, header says {info.shape}")
    return w.astype(dtype)


def convert_weights(path: Path, header: GGUFHeader, dtype: mx.Dtype) -> dict[str, mx.array]:
    """HF-named float weights, with llama.cpp's q/k row permutation undone."""
    metadata = header.metadata
    n_head = metadata["llama.attention.head_count"]
    n_head_kv = metadata.get("llama.attention.head_count_kv", n_head)
    try:
        weights = mx.load(str(path))
    except (RuntimeError, ValueError) as e:
        raise ForgeError(f"unreadable GGUF tensor data: {e}", where=str(path)) from e
    out = {}
    for info in header.tensors:
        w = load_tensor(weights, info, dtype)
        if info.name.endswith(".attn_q.weight"):
            w = unpermute_qk(w, n_head)
        elif info.name.endswith(".attn_k.weight"):
            w = unpermute_qk(w, n_head_kv)
        out[hf_name(info.name)] = w
    return out


def read_llama_header(path: Path) -> GGUFHeader:
    """The header of a llama GGUF, or a ForgeError that says what the file is instead."""
    if not path.is_file():
        raise ForgeError("GGUF file not found", where=str(path), hint="check the path")
    header = read_gguf_header(path)
    arch = header.metadata.get("general.architecture")
    if arch != "llama":
        raise ForgeError(
            f"GGUF architecture is '{arch}', not 'llama'",
            where=str(path),
            hint="only llama GGUFs are imported",
        )
    check_tensors(header, path)
    return header


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write a llama GGUF as an HF folder (weights, config, tokenizer); atomic: a temp folder renamed last."""
    path, out = Path(gguf_path), Path(out_dir)
    if dtype not in DTYPES:
        raise ForgeError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    if out.exists() and any(out.iterdir()):
        raise ForgeError("output folder exists and is not empty", where=str(out), hint="remove it or pick another")
    header = read_llama_header(path)
    weights = convert_weights(path, header, DTYPES[dtype])
    metadata = header.metadata
    tied = "lm_head.weight" not in weights
    config = llama_config(metadata, weights["model.embed_tokens.weight"].shape[0], tied, dtype, path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as e:
        raise ForgeError(f"cannot create the output folder: {e.strerror}", where=str(out)) from None
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "pt"})
        _write_json(tmp / "config.json", config)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        _write_json(tmp / "generation_config.json", generation)
        write_tokenizer(metadata, tmp, str(path))
        _write_json(tmp / MARKER, {"source": path.name, "source_bytes": path.stat().st_size, "dtype": dtype})
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a folder on every OS
        try:
            tmp.rename(out)
        except OSError as e:
            raise ForgeError(f"output folder appeared during the import: {e}", where=str(out)) from e
    except (OSError, RuntimeError) as e:  # a full disk; MLX reports a failed write as RuntimeError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ForgeError(
            f"cannot write the imported model: {reason}",
            where=str(out),
            hint="check free disk space; nothing was left behind",
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
