"""NF4 against an independent numpy bitsandbytes, NF4Linear, the bnb-4bit layout and bitsandbytes."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from forge_mlx.errors import ForgeError
from forge_mlx.quant import dequantize_residual, make_residual, quantize_dequantize
from forge_mlx.quant.bnb_layout import from_bnb_tensors, to_bnb_tensors
from forge_mlx.quant.nf4 import NF4Linear, dequantize_nf4, dynamic_map, quantize_nf4

# The 16 NF4 levels as bitsandbytes lists them (functional.get_4bit_type / backends/utils._NF4_QUANT_TABLE).
LEVELS = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
     0.7229568362236023, 1.0],
    np.float32,
)  # fmt: skip
F32 = np.float32


def ref_blockwise(x: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    """Block by block: absmax, x * (1/absmax) in fp32, nearest code by exact distance (ties: lower)."""
    codes, absmax = [], []
    for start in range(0, x.size, blocksize):
        block = x[start : start + blocksize]
        am = np.abs(block).max()
        scaled = block * (F32(1) / max(am, F32(1e-38)))
        dist = np.abs(scaled.astype(np.float64)[:, None] - code.astype(np.float64)[None, :])
        codes.append(dist.argmin(axis=1))
        absmax.append(am)
    return np.concatenate(codes).astype(np.uint8), np.array(absmax, F32)


def ref_quantize(w: np.ndarray, blocksize: int, double_quant: bool) -> dict:
    flat = w.astype(F32).reshape(-1)
    codes, absmax = ref_blockwise(flat, LEVELS, blocksize)
    if codes.size % 2:
        codes = np.append(codes, 7)  # bitsandbytes pads the scaled values with 0.0, i.e. code 7
    out = {"packed": codes[0::2] * 16 + codes[1::2], "absmax": absmax}
    if double_quant:
        offset = F32(np.mean(absmax.astype(np.float64)))
        out["absmax"], out["nested_absmax"] = ref_blockwise(absmax - offset, dynamic_map(), 256)
        out["offset"] = offset
    return out


def ref_dequantize(ref: dict, n: int, blocksize: int) -> np.ndarray:
    absmax = ref["absmax"]
    if "offset" in ref:
        scales = np.repeat(ref["nested_absmax"], 256)[: absmax.size]
        absmax = dynamic_map()[absmax] * scales + ref["offset"]  # fp32 multiply, then fp32 add
    codes = np.stack([ref["packed"] >> 4, ref["packed"] & 15], axis=1).reshape(-1)[:n]
    return LEVELS[codes] * np.repeat(absmax, blocksize)[:n]


CASES = [
    ((64, 128), 64, True),  # whole blocks
    ((33, 7), 64, True),  # odd element count and a last partial block
    ((300, 130), 64, True),  # 610 blocks: three nested blocks, the last partial
    ((16, 48), 32, False),
    ((40, 100), 128, False),  # partial last block without double quantization
    ((9,), 64, True),  # one partial block, 1-D
]


@pytest.mark.parametrize("shape,blocksize,double_quant", CASES)
def test_quantize_matches_reference_bit_for_bit(shape, blocksize, double_quant):
    w = np.random.default_rng(0).standard_normal(shape).astype(F32) * 0.05
    t = quantize_nf4(mx.array(w), blocksize, double_quant)
    ref = ref_quantize(w, blocksize, double_quant)
    n = w.size
    assert t.packed.dtype == mx.uint8 and t.packed.shape == ((n + 1) // 2,)
    np.testing.assert_array_equal(np.array(t.packed), ref["packed"])
    np.testing.assert_array_equal(np.array(t.absmax), ref["absmax"])
    assert t.double_quant == double_quant
    if double_quant:
        assert t.absmax.dtype == mx.uint8
        np.testing.assert_array_equal(np.array(t.nested_absmax), ref["nested_absmax"])
        assert np.array(t.offset) == ref["offset"]
    # Same fp32 operations in the same order (code * scale; nested: code * scale + offset): exact equality.
    deq = np.array(dequantize_nf4(t))
    assert deq.shape == shape and deq.dtype == np.float32
    np.testing.assert_array_equal(deq.reshape(-1), ref_dequantize(ref, n, blocksize))


def test_dequantize_error_is_within_half_a_level_gap():
    w = np.random.default_rng(1).standard_normal((32, 64)).astype(F32)
    deq = np.array(dequantize_nf4(quantize_nf4(mx.array(w), 64, False))).reshape(-1, 64)
    # nearest level: error <= half the widest gap (0.3038 / 2, between -1 and -0.696) times the block absmax
    absmax = np.abs(w.reshape(-1, 64)).max(axis=1, keepdims=True)
    assert (np.abs(deq - w.reshape(-1, 64)) <= 0.1520 * absmax).all()


def test_ties_go_to_the_lower_level_and_first_element_is_the_high_nibble():
    mid_8_9 = (LEVELS[8] + LEVELS[9]) / F32(2)  # fp32 midpoints, as bitsandbytes compares against
    mid_5_6 = (LEVELS[5] + LEVELS[6]) / F32(2)
    w = np.array([mid_8_9, 1.0, mid_5_6, -0.0], F32)  # absmax 1.0: scaled values are the inputs themselves
    t = quantize_nf4(mx.array(w), 32, False)
    assert np.array(t.packed).tolist() == [(8 << 4) | 15, (5 << 4) | 7]


def test_zero_block_and_dtype():
    t = quantize_nf4(mx.zeros((4, 16), mx.bfloat16), 64, True)
    assert t.dtype == mx.bfloat16 and np.array(t.packed).tolist() == [0x77] * 32  # code 7 is 0.0
    out = dequantize_nf4(t)
    assert out.dtype == mx.bfloat16 and not mx.any(out).item()
    assert dequantize_nf4(t, mx.float32).dtype == mx.float32


def test_dynamic_map_shape_and_symmetry():
    code = dynamic_map()
    assert code.dtype == np.float32 and code.shape == (256,) and (np.diff(code) > 0).all()
    # 127 negative codes, 0, 127 positive codes mirroring them, then 1.0; smallest magnitude 1e-6 * 0.55
    assert code[127] == 0 and code[255] == 1 and np.array_equal(code[:127], -code[128:255][::-1])
    assert code[0] == F32(-0.99296875) and code[128] == F32(1e-6) * F32(0.55)


def test_bad_blocksize_and_non_finite_weights_are_user_errors():
    with pytest.raises(ForgeError, match="block size 48"):
        quantize_nf4(mx.zeros((4, 48)), 48)
    with pytest.raises(ForgeError, match="layers.3.q_proj.*NaN"):
        make_residual(mx.array([[1.0, float("nan")]]), "nf4", name="layers.3.q_proj")


def test_nf4_linear_forward_freeze_compile_and_grad():
    rng = np.random.default_rng(2)
    w, b = rng.standard_normal((24, 64)).astype(F32), rng.standard_normal(24).astype(F32)
    x = mx.array(rng.standard_normal((3, 5, 64)).astype(F32))
    layer = make_residual(mx.array(w), "nf4", bias=mx.array(b), blocksize=32)
    assert isinstance(layer, NF4Linear) and layer.shape == (24, 64)
    deq = dequantize_residual(layer)
    expected = x @ deq.T + mx.array(b)
    # the layer runs this same matmul on the same fp32 arrays: only summation order could differ
    assert mx.allclose(layer(x), expected, rtol=1e-6, atol=1e-6).item()
    assert mx.allclose(mx.compile(layer)(x), expected, rtol=1e-6, atol=1e-6).item()
    grad = mx.grad(lambda v: layer(v).sum())(x)  # d/dx sum(x W^T) = 1 W for every row
    assert mx.allclose(grad, mx.broadcast_to(deq.sum(axis=0), x.shape), rtol=1e-5, atol=1e-5).item()
    assert layer(x.astype(mx.bfloat16)).dtype == mx.bfloat16

    model = nn.Sequential(layer, nn.Linear(24, 4))
    model.freeze()
    model.layers[1].unfreeze()
    assert [k for k, _ in tree_flatten(model.trainable_parameters())] == ["layers.1.weight", "layers.1.bias"]
    assert tree_flatten(layer.trainable_parameters()) == []  # frozen on creation, too


def test_nf4_linear_save_load_round_trip(tmp_path):
    w = mx.array(np.random.default_rng(3).standard_normal((16, 96)).astype(F32))
    layer = NF4Linear.from_weight(w, 64, True, bias=mx.ones((16,)), dtype=mx.bfloat16)
    layer.save_weights(str(tmp_path / "r.safetensors"))
    loaded = NF4Linear(96, 16, bias=True, blocksize=64, double_quant=True, dtype=mx.bfloat16)
    loaded.load_weights(str(tmp_path / "r.safetensors"))
    assert mx.array_equal(loaded.dequantize(mx.float32), layer.dequantize(mx.float32)).item()
    assert mx.array_equal(loaded.bias, layer.bias).item() and loaded.bias.dtype == mx.bfloat16
    assert mx.array_equal(dequantize_residual(loaded), dequantize_nf4(layer.tensor, mx.float32)).item()


def test_quantize_dequantize_is_the_layer_weight():
    w = mx.array(np.random.default_rng(4).standard_normal((8, 128)).astype(F32))
    expected = dequantize_nf4(quantize_nf4(w, 128, False), mx.float32)
    assert mx.array_equal(quantize_dequantize(w, "nf4", blocksize=128, double_quant=False), expected).item()


def test_bnb_layout_round_trip_and_keys():
    w = mx.array(np.random.default_rng(5).standard_normal((20, 33)).astype(F32))
    t = quantize_nf4(w, 64, True, dtype=mx.bfloat16)
    tensors = to_bnb_tensors("model.layers.0.mlp.up_proj", t)
    p = "model.layers.0.mlp.up_proj.weight"
    assert list(tensors) == [
        p, f"{p}.absmax", f"{p}.quant_map", f"{p}.nested_absmax", f"{p}.nested_quant_map",
        f"{p}.quant_state.bitsandbytes__nf4",
    ]  # fmt: skip
    assert tensors[p].shape == (330, 1) and tensors[p].dtype == np.uint8
    np.testing.assert_array_equal(tensors[f"{p}.quant_map"], LEVELS)
    state = json.loads(tensors[f"{p}.quant_state.bitsandbytes__nf4"].tobytes())
    assert list(state) == [
        "quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
    ]  # fmt: skip
    assert state["dtype"] == "bfloat16" and state["shape"] == [20, 33] and state["nested_blocksize"] == 256
    assert F32(state["nested_offset"]) == np.array(t.offset)

    back = from_bnb_tensors("model.layers.0.mlp.up_proj", {k: mx.array(v) for k, v in tensors.items()})
    assert back.shape == t.shape and back.blocksize == 64 and back.dtype == mx.bfloat16
    assert mx.array_equal(dequantize_nf4(back, mx.float32), dequantize_nf4(t, mx.float32)).item()


def test_bnb_layout_without_double_quant_and_bad_input():
    t = quantize_nf4(mx.ones((4, 8)), 32, False)
    tensors = to_bnb_tensors("q", t)
    assert "q.weight.nested_absmax" not in tensors
    back = from_bnb_tensors("q", tensors)
    assert not back.double_quant and mx.array_equal(dequantize_nf4(back), dequantize_nf4(t)).item()
    with pytest.raises(ForgeError, match="q.weight.*'q.weight.absmax' is missing"):
        from_bnb_tensors("q", {k: v for k, v in tensors.items() if not k.endswith("absmax")})
    fp4 = dict(tensors)
    fp4["q.weight.quant_state.bitsandbytes__nf4"] = np.frombuffer(b'{"quant_type": "fp4"}', np.uint8)
    with pytest.raises(ForgeError, match="quant_type is 'fp4'"):
        from_bnb_tensors("q", fp4)


# ---- against bitsandbytes itself (CPU build; skipped when it is not installed) ----


def _bnb():
    pytest.importorskip("torch")
    return pytest.importorskip("bitsandbytes.functional")


def _bnb_tensors(prefix, packed, state) -> dict:
    return {f"{prefix}.weight": packed.numpy()} | {
        f"{prefix}.weight.{k}": v.numpy() for k, v in state.as_dict(packed=True).items()
    }


def test_dynamic_map_equals_bitsandbytes():
    np.testing.assert_array_equal(dynamic_map(), _bnb().create_dynamic_map(signed=True).numpy())


@pytest.mark.parametrize("shape,blocksize,double_quant", CASES)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matches_bitsandbytes(shape, blocksize, double_quant, dtype):
    F = _bnb()
    import torch

    w = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(getattr(torch, dtype))
    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    t = quantize_nf4(mx.array(w.float().numpy()).astype(getattr(mx, dtype)), blocksize, double_quant)
    np.testing.assert_array_equal(np.array(t.packed), packed.numpy().reshape(-1))
    if not double_quant:
        np.testing.assert_array_equal(np.array(t.absmax), state.absmax.numpy())

    # Loading bitsandbytes' tensors: our dequantization equals its dequantize_4bit bit for bit.
    theirs = from_bnb_tensors("m", _bnb_tensors("m", packed, state))
    expected = F.dequantize_4bit(packed, state).float().numpy()
    np.testing.assert_array_equal(np.array(dequantize_nf4(theirs).astype(mx.float32)), expected)

    # bitsandbytes reading our tensors dequantizes to our values bit for bit.
    ours = {k.removeprefix("m.weight."): torch.from_numpy(v) for k, v in to_bnb_tensors("m", t).items()}
    qs = F.QuantState.from_dict({k: v for k, v in ours.items() if k != "m.weight"}, torch.device("cpu"))
    np.testing.assert_array_equal(
        F.dequantize_4bit(ours["m.weight"], qs).float().numpy(),
        np.array(dequantize_nf4(t).astype(mx.float32)),
    )


def test_double_quant_matches_bitsandbytes_when_the_offset_is_exact():
    """With absmax values on a 2^-8 grid over 64 blocks the float32 mean is exact in any summation order,
    so torch's offset equals ours; codes then agree except where bitsandbytes' CPU kernel, a 65536-entry
    lookup table over [-1, 1], cannot resolve a value within 2/65535 of a midpoint between two codes."""
    F = _bnb()
    import torch

    rng = np.random.default_rng(7)
    w = rng.uniform(-1, 1, (64, 64)).astype(F32)
    w[np.arange(64), rng.integers(0, 64, 64)] = rng.integers(256, 1024, 64) / 256 * rng.choice([-1, 1], 64)
    packed, state = F.quantize_4bit(torch.from_numpy(w), blocksize=64, compress_statistics=True, quant_type="nf4")
    t = quantize_nf4(mx.array(w), 64, True)
    np.testing.assert_array_equal(np.array(t.packed), packed.numpy().reshape(-1))
    assert np.array(t.offset) == state.offset.numpy()
    np.testing.assert_array_equal(np.array(t.nested_absmax), state.state2.absmax.numpy())
    ours, theirs = np.array(t.absmax), state.absmax.numpy()
    code = dynamic_map()
    x = (np.abs(w).max(axis=1) - state.offset.numpy()) * (F32(1) / state.state2.absmax.numpy()[0])
    nearest = np.abs(x[:, None].astype(np.float64) - code[None, :]).argmin(axis=1)
    np.testing.assert_array_equal(ours, nearest)
    differ = ours != theirs
    midpoint = (code[ours] + code[theirs]) / 2
    assert (np.abs(ours[differ].astype(int) - theirs[differ]) == 1).all()
    assert (np.abs(x[differ] - midpoint[differ]) < 2 / 65535).all()
    expected = json.loads(bytes(state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"].numpy()))
    assert json.loads(to_bnb_tensors("m", t)["m.weight.quant_state.bitsandbytes__nf4"].tobytes()) == expected


def test_nearest_codes_counts_midpoints_below_with_ties_to_the_lower_code():
    """The comparison count must equal np.searchsorted(side='left') exactly, midpoints and their neighbours too."""
    from forge_mlx.nf4_codebook import NF4_LEVELS, nearest_codes

    code = np.array(NF4_LEVELS, np.float32)
    mid = (code[:-1] + code[1:]) / np.float32(2)
    values = np.concatenate(
        [mid, np.nextafter(mid, np.float32(2)), np.nextafter(mid, np.float32(-2)), code, [-1.0, 1.0, 0.0]]
    ).astype(np.float32)
    values = np.concatenate([values, np.random.default_rng(5).uniform(-1, 1, 10_000).astype(np.float32)])
    assert np.array_equal(nearest_codes(values, mid), np.searchsorted(mid, values, side="left"))
