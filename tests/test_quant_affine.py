"""MLX affine residuals against a numpy unpacking of mx.quantize, their errors, and the residual interface."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from forge_mlx.errors import ForgeError
from forge_mlx.quant import RESIDUAL_KINDS, cache_dequantized, dequantize_residual, make_residual, quantize_dequantize
from forge_mlx.quant.affine import affine_linear


def numpy_dequantize(layer: nn.QuantizedLinear) -> np.ndarray:
    """scale * q + bias per group, with q unpacked from the little-endian uint32 words in numpy."""
    words = np.array(layer.weight).view(np.uint32)  # (out, in * bits / 32)
    per_word = 32 // layer.bits
    shifts = np.arange(per_word, dtype=np.uint32) * layer.bits
    q = ((words[..., None] >> shifts) & ((1 << layer.bits) - 1)).reshape(words.shape[0], -1)  # (out, in)
    scales = np.repeat(np.array(layer.scales, np.float32), layer.group_size, axis=1)
    biases = np.repeat(np.array(layer.biases, np.float32), layer.group_size, axis=1)
    return scales * q + biases


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_affine_dequantize_matches_numpy_and_error_is_one_step(bits, group_size):
    w = np.random.default_rng(0).standard_normal((24, 256)).astype(np.float32)
    layer = affine_linear(mx.array(w), group_size, bits)
    assert isinstance(layer, nn.QuantizedLinear) and (layer.bits, layer.group_size) == (bits, group_size)
    deq = np.array(dequantize_residual(layer))
    # one fp32 multiply-add per element in either: equal up to the rounding of that (fma or not) step
    np.testing.assert_allclose(deq, numpy_dequantize(layer), rtol=0, atol=1e-6)
    # MLX shifts the grid so 0 is exact, so rounding is within one step (not half) of the group's scale
    step = np.repeat(np.abs(np.array(layer.scales)), group_size, axis=1)
    assert (np.abs(deq - w) <= step * (1 + 1e-5)).all()
    assert np.array_equal(np.array(quantize_dequantize(mx.array(w), "affine", group_size=group_size, bits=bits)), deq)


def test_affine_forward_matches_dense_matmul():
    rng = np.random.default_rng(1)
    w, b = mx.array(rng.standard_normal((16, 128)).astype(np.float32)), mx.array(rng.standard_normal(16))
    x = mx.array(rng.standard_normal((3, 128)).astype(np.float32))
    layer = make_residual(w, "affine", bias=b.astype(mx.float32), bits=8)
    expected = x @ dequantize_residual(layer).T + b
    # quantized_matmul sums 128 products in fp32 in its own order: ~sqrt(128) * eps * |terms| ~ 1e-5
    assert mx.allclose(layer(x), expected, rtol=1e-5, atol=1e-4).item()


def test_group_size_error_names_the_layer_and_the_valid_sizes():
    with pytest.raises(ForgeError, match=r"layers.2.mlp.down_proj: group size 64 .* 96 input .*sizes here: 32\)"):
        make_residual(mx.zeros((8, 96)), "affine", name="layers.2.mlp.down_proj")
    with pytest.raises(ForgeError, match="o_proj.*none, keep this layer unquantized"):
        affine_linear(mx.zeros((8, 100)), 32, name="o_proj")
    with pytest.raises(ForgeError, match="bits must be one of"):
        affine_linear(mx.zeros((8, 128)), 64, bits=3)


def test_affine_dtype_follows_the_residual_dtype():
    layer = make_residual(mx.ones((4, 64)), "affine", bias=mx.ones((4,)), dtype=mx.bfloat16)
    assert layer.scales.dtype == mx.bfloat16 and layer.bias.dtype == mx.bfloat16
    assert dequantize_residual(layer).dtype == mx.float32


@pytest.mark.parametrize("kind", RESIDUAL_KINDS)
def test_every_kind_is_frozen_and_dequantizes_to_its_forward(kind):
    rng = np.random.default_rng(2)
    w, b = mx.array(rng.standard_normal((8, 64)).astype(np.float32)), mx.array(rng.standard_normal(8))
    layer = make_residual(w, kind, bias=b.astype(mx.float32))
    assert tree_flatten(layer.trainable_parameters()) == []
    deq = dequantize_residual(layer)
    assert deq.shape == (8, 64) and deq.dtype == mx.float32
    x = mx.array(rng.standard_normal((2, 64)).astype(np.float32))
    assert mx.allclose(layer(x), x @ deq.T + b, rtol=1e-5, atol=1e-4).item()  # fp32 matmul order, as above


def test_none_kind_is_the_weight_in_dtype():
    w = mx.array(np.random.default_rng(3).standard_normal((8, 64)).astype(np.float32))
    layer = make_residual(w, "none", dtype=mx.bfloat16)
    assert isinstance(layer, nn.Linear) and layer.weight.dtype == mx.bfloat16 and "bias" not in layer
    assert mx.array_equal(quantize_dequantize(w, "none"), w).item()
    assert mx.array_equal(dequantize_residual(layer), w.astype(mx.bfloat16).astype(mx.float32)).item()


def test_unknown_kind_is_a_user_error():
    with pytest.raises(ForgeError, match="unknown residual kind 'int4'.*none, affine, nf4"):
        make_residual(mx.zeros((4, 64)), "int4")


def test_a_quantized_tied_embedding_reads_and_projects_through_its_dequantized_copy():
    """mlx_lm's 4-bit models quantize the embedding, which small models tie as the LM head."""
    rng = np.random.default_rng(4)
    embedding = nn.Embedding(96, 64)
    embedding.weight = mx.array(rng.standard_normal((96, 64)).astype(np.float32))
    quantized = nn.QuantizedEmbedding.from_embedding(embedding, group_size=64, bits=4)
    ids, h = mx.array([[3, 95, 0]]), mx.array(rng.standard_normal((1, 3, 64)).astype(np.float32))
    want_rows, want_logits = quantized(ids), quantized.as_linear(h)  # MLX's own 4-bit kernels
    cached = cache_dequantized(quantized)
    assert "_dequantized" in cached and isinstance(cached, nn.QuantizedEmbedding)
    # MLX's fp32 scale * q + bias vs numpy's float64: one rounding apart, under 1e-6 for |w| < 4
    assert np.abs(np.array(cached._dequantized) - numpy_dequantize(quantized)).max() < 1e-6
    assert mx.array_equal(cached(ids), want_rows).item()  # a gather of the same values
    # the 4-bit matmul kernel and BLAS sum 64 products in another order: fp32 round-off, ~1e-5 on values ~8
    assert mx.allclose(cached.as_linear(h), want_logits, rtol=1e-5, atol=1e-4).item()
