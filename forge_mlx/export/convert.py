"""PiSSA -> LoRA on the ORIGINAL base (PiSSA paper, sec. 4 / PEFT's subtract_mutated_init), and how far that
LoRA is from the trained model when the residual was quantized.

PiSSA init: W = W_res + s * A0 B0; trained: W_res + s * A B; the update s * (A B - A0 B0) is
s * [A | A0] [B ; -B0], a rank-2r LoRA on W. With a 4-bit residual the trained model computes Q(W_res) instead
of W_res, and the frozen non-target linears Q(W) instead of W: a LoRA on the original base differs from it by
those rounding errors.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

from forge_mlx.adapters import PiSSALinear
from forge_mlx.errors import ForgeError
from forge_mlx.quant import NF4Linear, dequantize_residual

# A few everyday inputs for the logit comparison: any text the tokenizer maps to ids will do.
SAMPLE_TEXTS = (
    "hello there, how are you today?",
    "You are a kind assistant. Why is the sky blue?",
    "One, two, three, four: the cat and the dog sat under the tree.",
    "def add(a, b):\n    return a + b\n",
)


@dataclass(frozen=True)
class LoraFactors:
    """One layer's LoRA in forge-mlx / mlx-lm layout: delta W = scale * (lora_a @ lora_b).T."""

    lora_a: mx.array  # (in, R) float32
    lora_b: mx.array  # (R, out) float32
    scale: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[1]


def pissa_to_lora(a: mx.array, b: mx.array, a0: mx.array, b0: mx.array) -> tuple[mx.array, mx.array]:
    """Rank-2r factors of A B - A0 B0: A' = [A | A0] (in, 2r), B' = [B ; -B0] (2r, out)."""
    return mx.concatenate([a, a0], axis=1), mx.concatenate([b, -b0], axis=0)


def lora_factors(model: nn.Module, init_weights: dict[str, mx.array], init: str) -> dict[str, LoraFactors]:
    """Each adapted layer's update relative to the original base, by module path: a plain LoRA run ("lora"
    init, B0 = 0) is its trained factors at rank r, a PiSSA run the rank-2r difference to its saved init."""
    factors = {}
    for path, module in model.named_modules():
        if not isinstance(module, PiSSALinear):
            continue
        a, b = module.lora_a.astype(mx.float32), module.lora_b.astype(mx.float32)
        if init != "lora":
            keys = (f"{path}.lora_a", f"{path}.lora_b")
            if any(k not in init_weights for k in keys):
                raise ForgeError(
                    f"the init adapters have no '{keys[0]}'",
                    where="adapters_init.safetensors",
                    hint="the run directory is incomplete; retrain or export --format hf",
                )
            a, b = pissa_to_lora(a, b, *(init_weights[k].astype(mx.float32) for k in keys))
        factors[path] = LoraFactors(a, b, float(module.scale))
    if not factors:
        raise ForgeError("the run's model has no adapted layers")
    mx.eval([(f.lora_a, f.lora_b) for f in factors.values()])
    return dict(sorted(factors.items()))


def most_common(values) -> object:
    return Counter(values).most_common(1)[0][0]


def _relative(diff: mx.array, ref: mx.array) -> float:
    return (mx.linalg.norm(diff) / mx.maximum(mx.linalg.norm(ref), 1e-30)).item()


def _summary(errors: dict[str, float]) -> dict | None:
    if not errors:
        return None
    worst = max(errors, key=errors.get)
    return {
        "layers": len(errors),
        "mean": statistics.fmean(errors.values()),
        "max": errors[worst],
        "max_layer": worst,
    }


def sample_inputs(tokenizer, texts=SAMPLE_TEXTS) -> list[list[int]]:
    return [ids for ids in (list(tokenizer.encode(t)) for t in texts) if ids]


def logits_of(model: nn.Module, inputs: list[list[int]]) -> list[mx.array]:
    out = [model(mx.array(ids)[None]).astype(mx.float32)[0] for ids in inputs]  # each (T, vocab)
    mx.eval(out)
    return out


def _dense(weight: mx.array, bias: mx.array | None, dtype: mx.Dtype) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = weight.astype(dtype)
    if bias is not None:
        layer.bias = bias.astype(dtype)
    return layer


def conversion_error(
    model: nn.Module, base: nn.Module, factors: dict[str, LoraFactors], inputs: list[list[int]]
) -> dict:
    """Relative weight error per layer of LoRA-on-base vs the trained model, and their logit difference on
    `inputs`. Turns `model` into the LoRA-on-base model layer by layer (one dense copy in memory, not two)."""
    trained = logits_of(model, inputs)
    modules, base_modules = dict(model.named_modules()), dict(base.named_modules())
    dtype = modules[next(iter(factors))].lora_a.dtype  # the compute dtype
    adapted, frozen, swaps = {}, {}, []
    for path, module in modules.items():
        if isinstance(module, PiSSALinear):
            weight = dequantize_residual(base_modules[path])  # (out, in) fp32, the original W
            f = factors[path]
            lora = weight + f.scale * (f.lora_a @ f.lora_b).T
            adapted[path] = _relative(lora - module.fuse(mx.float32).weight, lora)
            swaps.append((path, _dense(lora, module.residual.get("bias"), dtype)))
        elif isinstance(module, (NF4Linear, nn.QuantizedLinear)) and path in base_modules:
            weight = dequantize_residual(base_modules[path])
            frozen[path] = _relative(weight - dequantize_residual(module), weight)
            swaps.append((path, _dense(weight, module.get("bias"), dtype)))
    model.update_modules(tree_unflatten(swaps))
    converted = logits_of(model, inputs)
    diffs = [mx.abs(t - c) for t, c in zip(trained, converted, strict=True)]
    agree = sum(
        int((mx.argmax(t, -1) == mx.argmax(c, -1)).sum().item()) for t, c in zip(trained, converted, strict=True)
    )
    tokens = sum(len(ids) for ids in inputs)
    return {
        "adapted_layers": _summary(adapted),
        "frozen_quantized_layers": _summary(frozen),
        "logits": {
            "inputs": len(inputs),
            "tokens": tokens,
            "max_abs_diff": max(d.max().item() for d in diffs),
            "mean_abs_diff": sum(d.sum().item() for d in diffs) / sum(d.size for d in diffs),
            "max_abs_logit": max(mx.abs(t).max().item() for t in trained),
            "top1_agreement": agree / tokens,
        },
    }


def describe_error(report: dict) -> list[str]:
    """Plain lines for the log and the model card."""
    lines = []
    for key, label in (
        ("adapted_layers", "adapted layers"),
        ("frozen_quantized_layers", "frozen 4-bit layers"),
    ):
        s = report[key]
        if s:
            lines.append(
                f"relative weight error, {label} ({s['layers']}): mean {s['mean']:.3e}, max {s['max']:.3e}"
                f" ({s['max_layer']})"
            )
    g = report["logits"]
    lines.append(
        f"logits on {g['inputs']} sample inputs ({g['tokens']} tokens): max |diff| {g['max_abs_diff']:.3e},"
        f" mean |diff| {g['mean_abs_diff']:.3e} (max |logit| {g['max_abs_logit']:.2f}), top-1 agreement "
        f"{100 * g['top1_agreement']:.1f}%"
    )
    return lines
