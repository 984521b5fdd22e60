"""`forge-mlx train` on torch: load with transformers, PiSSA-adapt, SFT, then DPO, writing the run directory
the MLX side writes (same files, names and layouts), so export, eval and runs.load_run work on a torch run."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from safetensors.numpy import load_file
from torch import nn

from forge_mlx import phases, reporting
from forge_mlx.adapter_import import check_layers, merged_weight, read_adapter
from forge_mlx.config import Config
from forge_mlx.errors import ForgeError
from forge_mlx.metrics_log import plot_losses
from forge_mlx.model_files import read_model_config, resolve_model_path
from forge_mlx.phases import pad_id, sft_splits  # noqa: F401  (torch_backend.bench reads its data through here)
from forge_mlx.run_files import (
    ADAPTER_CONFIG,
    FINAL_ADAPTERS,
    INIT_ADAPTERS,
    adapter_metadata,
    atomic_write_text,
    latest_good,
    phase_done,
    prepare_run_dir,
    real_rows,
    save_numpy_arrays,
)
from forge_mlx.torch_backend.adapters import (
    adapter_weights,
    apply_adapters,
    load_adapter_weights,
    quantize_frozen_linears,
)
from forge_mlx.torch_backend.device import compute_dtype, pick_device
from forge_mlx.torch_backend.losses import sft_loss
from forge_mlx.torch_backend.quant import cache_dequantized
from forge_mlx.torch_backend.train import make_optimizer, resume_point, to_numpy, train_loop


def load_model(name: str, dtype: str = "auto", device: torch.device | None = None):
    """(model, tokenizer, config.json, device) through transformers: safetensors only, never remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    device = device or pick_device()
    path = resolve_model_path(name)
    model_config = read_model_config(path)
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=compute_dtype(dtype, device), use_safetensors=True, trust_remote_code=False
        )
    except (ValueError, KeyError) as exc:
        raise ForgeError(
            f"transformers cannot load this model ({str(exc).splitlines()[0]})",
            where=str(path / "config.json"),
            hint="use backend: mlx, or a supported architecture",
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    return model.to(device), tokenizer, model_config, device


@torch.no_grad()
def merge_imported_adapter(model: nn.Module, path: str, log=print) -> int:
    """Fold a PEFT or mlx-lm LoRA into every layer it touches, as forge_mlx.pipeline.merge_imported_adapter.

    A head tied to the embeddings is no layer of its own (MLX has none), so an adapter on it is refused there too.
    """
    imported = read_adapter(path)
    tied = model.get_input_embeddings().weight
    linears = {p: m for p, m in model.named_modules() if isinstance(m, nn.Linear) and m.weight is not tied}
    check_layers(imported, {p: tuple(m.weight.shape) for p, m in linears.items()})
    for name, layer in imported.layers.items():
        weight = linears[name].weight
        merged = merged_weight(weight.float().cpu().numpy(), layer)  # (out, in) fp32
        linears[name].weight = nn.Parameter(torch.from_numpy(merged).to(weight.device, weight.dtype))
    log(f"  merged {len(imported.layers)} layers of the {imported.kind} adapter {imported.path} into the base weights")
    return len(imported.layers)


def adapt(model: nn.Module, config: Config, device: torch.device, log=print) -> dict:
    """PiSSA (or LoRA) adapters on the targets over a quantized residual, as forge_mlx.pipeline.adapt."""
    a = config.adapter
    merged = merge_imported_adapter(model, a.import_adapter, log) if a.import_adapter else 0
    report = apply_adapters(model, dtype=compute_dtype(config.dtype, device), **phases.adapter_options(config, log))
    report["imported_layers_merged"] = merged
    report["frozen_linears_quantized"] = quantize_frozen_linears(model, a.residual, **phases.quant_options(a))
    if a.cpu_dequant_cache and device.type == "cpu":
        for module in model.modules():
            cache_dequantized(module)
    return report


def tensors(arrays: tuple, device: torch.device) -> tuple[torch.Tensor, ...]:
    """A batch's numpy arrays on `device`; the token ids (first) as int64, which embedding lookups take."""
    tokens, *rest = arrays
    return (torch.from_numpy(tokens).long().to(device), *(torch.from_numpy(a).to(device) for a in rest))


def sft_tensors(batch, device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    arrays, n_tokens = phases.sft_rows(batch, real_rows(batch))
    return tensors(arrays, device), n_tokens


def sft_loss_fn(chunk_size: int | None):
    return phases.sft_loss_fn(sft_loss, chunk_size)


def train_backend(model: nn.Module, device: torch.device) -> phases.TrainBackend:
    """torch's optimizer over the model's adapters, checkpoint resume and loop on `device`, for
    phases.train_phase."""
    return phases.TrainBackend(
        partial(make_optimizer, model), partial(resume_point, device=device), partial(train_loop, device=device)
    )


def run_sft(model, tokenizer, config: Config, run_dir: Path, resume: bool, device: torch.device, log=print) -> dict:
    sft = phases.sft_phase(config, tokenizer, log)
    loss_fn = sft_loss_fn(config.train.loss_chunk_size)
    arrays = partial(sft_tensors, device=device)
    return phases.train_phase(
        train_backend(model, device), model, sft, loss_fn, arrays, arrays, config, run_dir, resume, log
    )


def save_adapters(path: Path, model: nn.Module) -> None:
    save_numpy_arrays(path, {k: to_numpy(v) for k, v in adapter_weights(model).items()})


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant: the frozen inputs need no grad)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_model(config: Config, device: torch.device | None = None, log=print):
    """(model, tokenizer, model config, device, adapter report): loaded, adapted, checkpointing set up."""
    torch.manual_seed(config.seed)
    log(f"loading {config.model}")
    model, tokenizer, model_config, device = load_model(config.model, config.dtype, device)
    log(f"adapting ({config.adapter.init}, rank {config.adapter.rank}, residual {config.adapter.residual}) on {device}")
    report = adapt(model, config, device, log)
    if config.train.grad_checkpoint:
        checkpoint_blocks(model)
    return model, tokenizer, model_config, device, report


def run_training(config: Config, resume: bool = False, log=print, device: torch.device | str | None = None) -> dict:
    """The whole job on torch; returns a summary that is also written to RUN/summary.json."""
    run_dir = prepare_run_dir(config, resume)
    with reporting.session(config, run_dir) as outcome:
        summary = train_run(config, run_dir, resume, log, device)
        outcome.exit_code = reporting.exit_code(summary)
    return summary


def train_run(config: Config, run_dir: Path, resume: bool, log=print, device: torch.device | str | None = None) -> dict:
    """Load, adapt, SFT, DPO and the final files, into a prepared run directory."""
    device = pick_device(str(device)) if device is not None else None
    model, tokenizer, model_config, device, report = prepare_model(config, device, log)
    meta = adapter_metadata(config, report, model_config)
    if not (run_dir / INIT_ADAPTERS).exists():
        save_adapters(run_dir / INIT_ADAPTERS, model)
        atomic_write_text(run_dir / ADAPTER_CONFIG, json.dumps(meta, indent=1))
    log(f"  {len(report['layers'])} adapted layers, {report['trainable_parameters']:,} trainable parameters")
    summary = {"adapter": meta, "backend": "torch", "device": str(device)}
    if config.data.train and not phase_done(run_dir, "sft"):
        summary["sft"] = run_sft(model, tokenizer, config, run_dir, resume, device, log)
        if summary["sft"]["interrupted"]:
            return summary
    elif phase_done(run_dir, "sft"):
        path, _ = latest_good(run_dir, "sft")
        if path is not None:
            load_adapter_weights(model, load_file(str(path / "adapters.safetensors")))
    if config.dpo.enabled:
        from forge_mlx.torch_backend.dpo import run_dpo

        summary["dpo"] = run_dpo(model, tokenizer, config, run_dir, resume, device, log)
        if summary["dpo"]["interrupted"]:
            return summary
    save_adapters(run_dir / FINAL_ADAPTERS, model)
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1, default=str))
    log(f"done: adapters in {run_dir / FINAL_ADAPTERS}")
    return summary
