"""The export's README.md: what the weights are (base, PiSSA/LoRA, residual format, config), how to load
them and the run's final metrics; for adapters, how far the LoRA on the original base is from the trained
model."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from forge_mlx.config import Config, to_dict
from forge_mlx.metrics_log import read_metrics
from forge_mlx.model_files import is_hub_id

LIBRARY = {"hf": "transformers", "peft": "peft", "mlx-lm": "mlx"}
PAPERS = {
    "pissa": "PiSSA (Meng et al. 2024, arXiv:2404.02948)",
    "lora": "LoRA (Hu et al. 2021, arXiv:2106.09685)",
}
WEIGHTS = {
    "hf": "**Weights.** Merged: W = dequant(residual) + scale * (A B)^T per adapted layer, computed in "
    "float32, the frozen 4-bit layers dequantized, stored as {dtype}: the model computes what the trained "
    "model did.",
    "pissa": "**Adapter.** The update relative to the original base, scale * (A B - A0 B0), as a LoRA of "
    "rank 2r ({dtype}).",
    "lora": "**Adapter.** The trained LoRA factors at rank r ({dtype}).",
}
GAP = {
    True: "The residual is full precision, so this adapter on the original base reproduces the trained model "
    "up to float rounding:",
    False: "The trained model computed over a 4-bit residual (and 4-bit frozen layers); this adapter applies "
    "to the original full-precision base, so the two differ by that rounding:",
}
USAGE = {
    "hf": "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
    'model = AutoModelForCausalLM.from_pretrained("PATH")\n'
    'tokenizer = AutoTokenizer.from_pretrained("PATH")\n```\n\nWith MLX: '
    '`mlx_lm.generate --model PATH --prompt "..."`.',
    "peft": "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\nbase = "
    'AutoModelForCausalLM.from_pretrained("{base}")\nmodel = PeftModel.from_pretrained(base, "PATH")\n```',
    "mlx-lm": "```python\nfrom mlx_lm import load\n\n"
    'model, tokenizer = load("{base}", adapter_path="PATH")\n```\n\n'
    'Or `mlx_lm.generate --model {base} --adapter-path PATH --prompt "..."`.',
}


def final_metrics(run_dir: Path) -> dict[str, dict]:
    """Per phase: steps, final training loss (summary.json) and the last validation record (metrics.jsonl)."""
    summary_file = Path(run_dir) / "summary.json"
    summary = json.loads(summary_file.read_text(encoding="utf-8")) if summary_file.exists() else {}
    records = read_metrics(Path(run_dir) / "metrics.jsonl")
    metrics = {}
    for phase in ("sft", "dpo"):
        entry = {k: summary[phase][k] for k in ("steps", "final_loss") if k in summary.get(phase, {})}
        vals = [r for r in records if r.get("phase") == phase and any(k.startswith("val_") for k in r)]
        if vals:
            entry.update({k: v for k, v in vals[-1].items() if k.startswith("val_")})
        if entry:
            metrics[phase] = entry
    return metrics


def residual_text(meta: dict) -> str:
    kind = meta.get("residual", "none")
    if kind == "nf4":
        double = ", double-quantized absmax" if meta.get("double_quant") else ""
        return f"NF4 (bitsandbytes layout, blocks of {meta.get('blocksize')}{double})"
    if kind == "affine":
        return f"MLX affine {meta.get('bits')}-bit, groups of {meta.get('group_size')}"
    return "full precision"


def method_text(meta: dict) -> str:
    init = meta.get("init", "pissa")
    targets = meta.get("targets", [])
    names = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
    return (
        f"{PAPERS['lora' if init == 'lora' else 'pissa']} adapters (init `{init}`, rank {meta.get('rank')}, "
        f"alpha {meta.get('alpha')}, scale {meta.get('scale')}) on {names} in {len(targets)} layers, trained "
        f"over a frozen residual stored as {residual_text(meta)}."
    )


def metrics_table(metrics: dict) -> list[str]:
    if not metrics:
        return ["No metrics recorded."]
    rows = [f"| {phase} | {k} | {_fmt(v)} |" for phase, entry in metrics.items() for k, v in entry.items()]
    return ["| phase | metric | value |", "|---|---|---|", *rows]


def model_card(
    fmt: str,
    meta: dict,
    config: Config,
    base_model: str,
    metrics: dict,
    dtype: str,
    gap: list[str] | None = None,
) -> str:
    """`gap`: the lines of convert.describe_error for adapter exports."""
    phases = ["sft", *(["dpo"] if config.dpo.enabled else [])]
    method = "lora" if meta.get("init") == "lora" else "pissa"
    front = {"library_name": LIBRARY[fmt], "tags": ["forge-mlx", "mlx", method, *phases]}
    if is_hub_id(base_model):
        front["base_model"] = base_model
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {Path(config.output_dir).name} ({fmt} export)", "",
        f"Fine-tuned from `{base_model}` with forge-mlx ({' then '.join(p.upper() for p in phases)}).", "",
        f"**Method.** {method_text(meta)}", "",
        WEIGHTS["hf" if fmt == "hf" else method].format(dtype=dtype), "",
    ]  # fmt: skip
    if gap:
        full_precision = meta.get("residual", "none") == "none"
        lines += ["## LoRA on the original base vs the trained model", "", GAP[full_precision], ""]
        lines += [f"- {line}" for line in gap] + [""]
    lines += ["## Usage", "", USAGE[fmt].format(base=base_model), "", "## Final metrics", ""]
    lines += metrics_table(metrics)
    config_yaml = yaml.safe_dump(to_dict(config), sort_keys=False).strip()
    lines += ["", "## Training config", "", "```yaml", config_yaml, "```", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
