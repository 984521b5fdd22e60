"""The adapter layer on a tiny random llama: output kept at init, trainable counts, fuse, load, errors."""

from pathlib import Path

import helpers
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.llama import Model

from forge_mlx.adapters import (
    PiSSALinear,
    adapter_weights,
    apply_adapters,
    find_targets,
    fuse_adapters,
    load_adapter_weights,
)
from forge_mlx.errors import ForgeError
from forge_mlx.quant import dequantize_residual

SMOLLM2 = Path("/work/main/models/SmolLM2-135M-Instruct")
TOKENS = mx.array([[3, 17, 42, 99, 5, 64, 1, 2]])
# (in, out) per target, by hand: head_dim = 64 / 4 = 16, so k/v project to 2 kv heads * 16 = 32.
SHAPES = {
    "q_proj": (64, 64),
    "k_proj": (64, 32),
    "v_proj": (64, 32),
    "o_proj": (64, 64),
    "gate_proj": (64, 128),
    "up_proj": (64, 128),
    "down_proj": (128, 64),
}


def tiny_llama(seed: int = 0) -> Model:
    return helpers.tiny_llama(seed, vocab_size=128, tie_word_embeddings=True)


def rel(a: mx.array, b: mx.array) -> float:
    return (mx.linalg.norm(a - b) / mx.linalg.norm(b)).item()


def perturb_adapters(model: nn.Module, seed: int = 1) -> None:
    """Stand in for training: move every factor so fused/loaded checks are not trivially at init."""
    weights = adapter_weights(model)
    keys = mx.random.split(mx.random.key(seed), len(weights))
    weights = {k: v + 0.05 * mx.random.normal(v.shape, key=keys[i]) for i, (k, v) in enumerate(weights.items())}
    load_adapter_weights(model, weights)


def test_find_targets_stays_inside_the_decoder_layers():
    model = tiny_llama()
    paths = find_targets(model, "attention")
    assert paths == [
        f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
    ]
    assert len(find_targets(model, "all-linear")) == 14
    assert find_targets(model, ["down_proj"]) == [
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.down_proj",
    ]
    with pytest.raises(ForgeError, match="embed_tokens"):
        find_targets(model, ["embed_tokens"])  # embeddings are never targets
    with pytest.raises(ForgeError, match="preset"):
        find_targets(model, "everything")


@pytest.mark.parametrize("alpha", [None, 4.0, 16.0, 2.0])
def test_pissa_init_keeps_logits_and_trains_only_the_factors(alpha):
    model = tiny_llama()
    base = model(TOKENS)
    report = apply_adapters(model, targets="all-linear", rank=4, alpha=alpha, init="pissa")
    # Each layer's W is rebuilt to fp32 round-off (~1e-7 relative, see test_pissa); through 2 blocks, norms
    # and softmax that stays ~1e-6 relative on the logits (4e-7 seen). 1e-5 leaves a margin and still
    # catches any wrong scale.
    assert rel(model(TOKENS), base) < 1e-5
    trainable = tree_flatten(model.trainable_parameters())
    assert {k.rsplit(".", 1)[-1] for k, _ in trainable} == {"lora_a", "lora_b"}
    # sum r * (in + out) by hand: 4 * (128 + 96 + 96 + 128 + 192 + 192 + 192) = 4096 per block, 2 blocks.
    assert sum(v.size for _, v in trainable) == report["trainable_parameters"] == 8192
    scale = (alpha or 8.0) / 4
    assert all(layer["scale"] == scale and layer["rank"] == 4 for layer in report["layers"].values())


def test_lora_init_is_exactly_the_base_model():
    model = tiny_llama()
    base = model(TOKENS)
    apply_adapters(model, targets="attention", rank=8, init="lora")
    # lora_b = 0 and the residual is W itself: the adapter adds exact zeros.
    assert mx.array_equal(model(TOKENS), base)
    a = adapter_weights(model)["model.layers.0.self_attn.q_proj.lora_a"]
    assert a.shape == (64, 8) and mx.abs(a).max().item() <= 1 / 8


def test_rank_pattern_sets_per_layer_ranks():
    model = tiny_llama()
    pattern = {"down_proj": 8, "model.layers.1.mlp.down_proj": 2}
    report = apply_adapters(model, targets="all-linear", rank=4, rank_pattern=pattern)
    ranks = {p: layer["rank"] for p, layer in report["layers"].items()}
    assert ranks["model.layers.0.mlp.down_proj"] == 8 and ranks["model.layers.1.mlp.down_proj"] == 2
    assert ranks["model.layers.1.self_attn.q_proj"] == 4
    # Layer 0: 4096 - 4 * 192 + 8 * 192; layer 1: 4096 - 4 * 192 + 2 * 192.
    assert report["trainable_parameters"] == (4096 + 4 * 192) + (4096 - 2 * 192)
    with pytest.raises(ForgeError, match="rank_pattern"):
        apply_adapters(tiny_llama(), targets="attention", rank=4, rank_pattern={"down_proj": 8})


def test_fuse_equals_the_adapted_forward():
    model = tiny_llama()
    apply_adapters(model, targets="all-linear", rank=4, init="pissa_niter_2")
    perturb_adapters(model)
    x = mx.random.normal((3, 64), key=mx.random.key(2))
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, PiSSALinear)
    fused = layer.fuse()
    # One fp32 (out, in) matmul vs residual matmul + two thin ones: both sum 64-128 products, ~1e-6 apart.
    assert rel(fused(x), layer(x)) < 1e-5
    assert rel(fused.weight, dequantize_residual(layer.residual) + layer.delta_weight()) == 0.0
    adapted = model(TOKENS)
    fuse_adapters(model)
    assert not any(isinstance(m, PiSSALinear) for _, m in model.named_modules())
    assert rel(model(TOKENS), adapted) < 1e-5


def test_adapter_weights_round_trip_through_a_fresh_model():
    model = tiny_llama()
    apply_adapters(model, targets="attention", rank=4)
    perturb_adapters(model)
    saved = adapter_weights(model)
    assert len(saved) == 16 and all(k.endswith((".lora_a", ".lora_b")) for k in saved)
    fresh = tiny_llama()
    apply_adapters(fresh, targets="attention", rank=4)
    load_adapter_weights(fresh, saved)
    assert mx.array_equal(fresh(TOKENS), model(TOKENS))  # same residuals (deterministic init), same factors
    with pytest.raises(ForgeError, match="missing"):
        load_adapter_weights(fresh, {k: v for k, v in saved.items() if "layers.1" not in k})
    with pytest.raises(ForgeError, match="shape"):
        load_adapter_weights(fresh, {k: v[:, :2] if k.endswith("lora_a") else v for k, v in saved.items()})


def test_errors_name_the_layer():
    with pytest.raises(ForgeError, match=r"model\.layers\.0\.self_attn\.k_proj.*rank 40"):
        apply_adapters(tiny_llama(), targets="attention", rank=40)  # k_proj is (32, 64): rank <= 32
    linear = nn.Linear(16, 8)
    with pytest.raises(ForgeError, match="init"):
        PiSSALinear.from_linear(linear, 4, init="pissa_niter_x")
    with pytest.raises(ForgeError, match="residual"):
        PiSSALinear.from_linear(linear, 4, residual="int3")
    with pytest.raises(ForgeError, match="alpha"):
        PiSSALinear.from_linear(linear, 4, alpha=0.0)


def test_from_linear_keeps_bias_and_matches_the_formula():
    linear = nn.Linear(24, 16, bias=True)
    layer = PiSSALinear.from_linear(linear, 4, alpha=3.0)
    x = mx.random.normal((5, 24), key=mx.random.key(3))
    # y = residual(x) + scale * (x @ a) @ b written out in numpy (float64) from the layer's own arrays.
    a, b, res, bias = (
        np.array(t, dtype=np.float64) for t in (layer.lora_a, layer.lora_b, layer.residual.weight, layer.residual.bias)
    )
    xn = np.array(x, dtype=np.float64)
    expected = xn @ res.T + bias + 0.75 * (xn @ a) @ b
    assert np.allclose(np.array(layer(x)), expected, atol=1e-5)  # fp32 sums of 24 terms of size ~1
    assert np.allclose(np.array(linear(x)), expected, atol=1e-5)  # and it is still the base layer at init
    assert mx.array_equal(layer.fuse().bias, linear.bias)


@pytest.mark.parametrize("kind", ["affine", "nf4"])
def test_quantized_residual_beats_quantizing_the_base(kind):
    model = tiny_llama()
    w = model.model.layers[0].mlp.down_proj.weight
    report = apply_adapters(model, targets=["down_proj"], rank=16, residual=kind, qpissa_iters=3, group_size=32)
    layer = model.model.layers[0].mlp.down_proj
    errors = report["layers"]["model.layers.0.mlp.down_proj"]["qpissa_errors"]
    fused_error = rel(layer.fuse().weight, w)
    assert len(errors) == 3 and fused_error == pytest.approx(min(errors), rel=1e-3)  # the kept iterate
    from forge_mlx.quant import quantize_dequantize

    direct = rel(quantize_dequantize(w, kind, group_size=32), w)
    # In a random (flat-spectrum) 64x128 matrix the top-16 directions carry ~half the energy, so quantizing
    # the smaller residual loses less than quantizing all of W.
    assert fused_error < direct
    x = mx.random.normal((2, 128), key=mx.random.key(4))
    assert rel(layer.fuse()(x), layer(x)) < 1e-5


def test_quantized_base_is_dequantized_first():
    model = tiny_llama()
    nn.quantize(model, group_size=32, bits=4)  # a quantized checkpoint: what the model computes is dequant(W)
    base = model(TOKENS)
    apply_adapters(model, targets="attention", rank=4)
    assert rel(model(TOKENS), base) < 1e-5  # same reasoning as the unquantized case
    with pytest.raises(ForgeError, match="quantized"):
        fresh = tiny_llama()
        nn.quantize(fresh, group_size=32, bits=4)
        apply_adapters(fresh, targets="attention", rank=4, dequantize_base=False)


@pytest.mark.slow
def test_smollm2_keeps_its_logits_under_pissa():
    if not (SMOLLM2 / "model.safetensors").exists():
        pytest.skip(f"{SMOLLM2} not downloaded")
    from mlx_lm.utils import load_model

    model = load_model(SMOLLM2)[0]
    tokens = mx.array([[1, 504, 3458, 314, 253, 1789, 30, 2]])
    base = model(tokens)
    report = apply_adapters(model, targets="all-linear", rank=16, init="pissa_niter_4")
    # 30 blocks of fp32 round-off (2e-6 seen); 1e-5 as for the tiny model but with 30 blocks of depth.
    assert rel(model(tokens), base) < 1e-5
    # By hand (hidden 576, 9 heads of 64 and 3 kv heads -> k/v out 192, intermediate 1536), per block:
    # 16 * ((576+576) * 2 + (576+192) * 2 + (576+1536) * 3) = 16 * 10176; 30 blocks; lm_head (tied) is not
    # adapted.
    assert len(report["layers"]) == 30 * 7 and report["trainable_parameters"] == 30 * 16 * 10176
