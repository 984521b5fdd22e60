"""The HF `*-bnb-4bit` tensors of one linear layer: hub QLoRA checkpoints load on a Mac, ours load on CUDA.

Keys under prefix P (bitsandbytes Params4bit + QuantState.as_dict(packed=True)): P.weight (uint8 (n/2, 1)),
P.weight.absmax, P.weight.quant_map, with double quantization P.weight.nested_absmax and
P.weight.nested_quant_map, and P.weight.quant_state.bitsandbytes__nf4 (uint8 bytes of a JSON dict).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import mlx.core as mx
import numpy as np

from forge_mlx.errors import ForgeError
from forge_mlx.quant.nf4 import NESTED_BLOCKSIZE, NF4_LEVELS, NF4Tensor

_STATE_KEY = "quant_state.bitsandbytes__nf4"
_DTYPES = ("float32", "float16", "bfloat16")


def _dtype_name(dtype: mx.Dtype) -> str:
    """'float32' for mx.float32: the spelling bitsandbytes writes (str(torch dtype) without 'torch.')."""
    return str(dtype).rsplit(".", 1)[-1]


def to_bnb_tensors(prefix: str, t: NF4Tensor) -> dict[str, np.ndarray]:
    """The tensors bitsandbytes saves for the Linear4bit at `prefix` (e.g. 'model.layers.0.mlp.up_proj')."""
    p = f"{prefix}.weight"
    tensors = {
        p: np.array(t.packed).reshape(-1, 1),
        f"{p}.absmax": np.array(t.absmax),
        f"{p}.quant_map": np.array(NF4_LEVELS, np.float32),
    }
    state = {
        "quant_type": "nf4",
        "blocksize": t.blocksize,
        "dtype": _dtype_name(t.dtype),
        "shape": list(t.shape),
    }
    if t.double_quant:
        tensors[f"{p}.nested_absmax"] = np.array(t.nested_absmax)
        tensors[f"{p}.nested_quant_map"] = np.array(t.nested_quant_map)
        state |= {
            "nested_blocksize": NESTED_BLOCKSIZE,
            "nested_dtype": "float32",
            "nested_offset": float(np.array(t.offset)),
        }
    tensors[f"{p}.{_STATE_KEY}"] = np.frombuffer(json.dumps(state).encode("utf-8"), np.uint8).copy()
    return tensors


def _expect(ok: bool, what: str, where: str) -> None:
    if not ok:
        hint = "is this a *-bnb-4bit checkpoint with quant_type nf4?"
        raise ForgeError(f"not a bitsandbytes NF4 weight: {what}", where=where, hint=hint)


def _bytes(x: object) -> np.ndarray:
    """The raw bytes of a packed weight; bitsandbytes may store them as another dtype (quant_storage)."""
    if isinstance(x, mx.array) and x.dtype != mx.uint8:
        x = x.view(mx.uint8)
    return np.asarray(x).view(np.uint8).reshape(-1)


def from_bnb_tensors(prefix: str, tensors: Mapping[str, object]) -> NF4Tensor:
    """Read the Linear4bit weight at `prefix` from a checkpoint's tensors (numpy or mlx arrays)."""
    p = f"{prefix}.weight"
    for key in (p, f"{p}.absmax", f"{p}.quant_map", f"{p}.{_STATE_KEY}"):
        _expect(key in tensors, f"tensor '{key}' is missing", p)
    state = json.loads(_bytes(tensors[f"{p}.{_STATE_KEY}"]).tobytes().decode("utf-8"))
    _expect(state.get("quant_type") == "nf4", f"quant_type is {state.get('quant_type')!r}", p)
    _expect(state.get("dtype") in _DTYPES, f"dtype {state.get('dtype')!r}", p)
    quant_map = np.asarray(tensors[f"{p}.quant_map"], np.float32)
    _expect(np.array_equal(quant_map, np.array(NF4_LEVELS, np.float32)), "quant_map is not the NF4 levels", p)
    shape, blocksize = tuple(state["shape"]), int(state["blocksize"])
    n, blocks = math.prod(shape), -(-math.prod(shape) // blocksize)
    packed = _bytes(tensors[p])
    absmax = np.asarray(tensors[f"{p}.absmax"]).reshape(-1)
    _expect(packed.size == (n + 1) // 2, f"{packed.size} packed bytes for shape {shape}", p)
    _expect(absmax.size == blocks, f"{absmax.size} absmax values for {blocks} blocks of {blocksize}", p)
    nested = {}
    if "nested_offset" in state:
        for key in (f"{p}.nested_absmax", f"{p}.nested_quant_map"):
            _expect(key in tensors, f"tensor '{key}' is missing", p)
        _expect(
            state.get("nested_blocksize") == NESTED_BLOCKSIZE,
            f"nested_blocksize {state.get('nested_blocksize')}",
            p,
        )
        nested = {
            "nested_absmax": mx.array(np.asarray(tensors[f"{p}.nested_absmax"], np.float32).reshape(-1)),
            "nested_quant_map": mx.array(np.asarray(tensors[f"{p}.nested_quant_map"], np.float32)),
            "offset": mx.array(np.float32(state["nested_offset"])),
        }
    absmax = absmax.astype(np.uint8 if nested else np.float32)
    dtype = getattr(mx, state["dtype"])
    return NF4Tensor(mx.array(packed), mx.array(absmax), shape, blocksize, dtype, **nested)
