"""`forge-mlx train` on torch: load with transformers, PiSSA-adapt, SFT, then DPO, writing the run directory
the MLX side writes (same files, names and layouts), so export, eval and runs.load_run work on a torch run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.numpy import load_file
from torch import nn

from forge_mlx.adapter_import import check_layers, merged_weight, read_adapter
from forge_mlx.config import Config
from forge_mlx.data.batching import BatchStream, eval_batches
from forge_mlx.data.jsonl import load_split
from forge_mlx.data.sft import encode_sft_split
from forge_mlx.errors import ForgeError
from forge_mlx.loop_common import LoopSpec
from forge_mlx.metrics_log import plot_losses
from forge_mlx.model_files import read_model_config, resolve_model_path
from forge_mlx.run_files import (
    ADAPTER_CONFIG,
    FINAL_ADAPTERS,
    INIT_ADAPTERS,
    adapter_metadata,
    atomic_write_text,
    latest_good,
    phase_done,
    phase_steps,
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
from forge_mlx.torch_backend.train import (
    make_optimizer,
    resume_point,
    to_numpy,
    train_loop,
)


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
    done = {"n": 0}

    def progress(path: str, entry: dict) -> None:
        done["n"] += 1
        if done["n"] == 1 or done["n"] % 10 == 0:
            log(f"  init {done['n']} layers ({path}: {entry['seconds']:.2f} s)")

    quant = dict(group_size=a.group_size, bits=a.bits, blocksize=a.blocksize, double_quant=a.double_quant)
    merged = merge_imported_adapter(model, a.import_adapter, log) if a.import_adapter else 0
    report = apply_adapters(
        model,
        targets=a.targets,
        rank=a.rank,
        alpha=a.alpha,
        init=a.init,
        residual=a.residual,
        rank_pattern=a.rank_pattern,
        seed=config.seed,
        on_layer=progress,
        qpissa_iters=a.qpissa_iters,
        dtype=compute_dtype(config.dtype, device),
        dropout=a.dropout,
        **quant,
    )
    report["imported_layers_merged"] = merged
    report["frozen_linears_quantized"] = quantize_frozen_linears(model, a.residual, **quant)
    if a.cpu_dequant_cache and device.type == "cpu":
        for module in model.modules():
            cache_dequantized(module)
    return report


def sft_tensors(batch, device: torch.device) -> tuple[tuple[torch.Tensor, torch.Tensor], int]:
    rows = real_rows(batch)
    tokens = torch.from_numpy(batch.tokens[rows]).long().to(device)
    return (tokens, torch.from_numpy(batch.loss_mask[rows]).to(device)), int(batch.lengths[rows].sum())


def sft_loss_fn(chunk_size: int | None):
    def loss_fn(model, tokens, mask):
        loss, n_tokens = sft_loss(model, tokens, mask, chunk_size=chunk_size)
        return loss, n_tokens, {}

    return loss_fn


def sft_splits(config: Config, tokenizer, log=print):
    """(train, valid or None) encoded SFT splits, as the MLX pipeline reads them."""
    d = config.data
    encode = dict(
        max_seq_length=d.max_seq_length, overlong=d.overlong, mask_prompt=d.mask_prompt, supervise=d.supervise
    )
    train_set = encode_sft_split(load_split(d.train, "train", kind="sft"), tokenizer, **encode)
    valid_source = d.valid or (d.train if Path(d.train).is_dir() else None)
    valid_data = load_split(valid_source, "valid", kind="sft", required=d.valid is not None) if valid_source else None
    valid_set = encode_sft_split(valid_data, tokenizer, **encode) if valid_data else None
    log(
        f"SFT data: {len(train_set.examples)} examples (truncated {train_set.truncated}, dropped "
        f"{train_set.dropped_overlong} over max_seq_length, {train_set.dropped_no_target} with no target)"
        + (f", valid {len(valid_set.examples)}" if valid_set else "")
    )
    return train_set, valid_set


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def run_sft(model, tokenizer, config: Config, run_dir: Path, resume: bool, device: torch.device, log=print) -> dict:
    t = config.train
    train_set, valid_set = sft_splits(config, tokenizer, log)
    pad = pad_id(tokenizer)
    stream = BatchStream(
        train_set.examples,
        t.batch_size,
        seed=config.seed,
        max_seq_length=config.data.max_seq_length,
        pad_id=pad,
    )
    steps = phase_steps(stream.batches_per_epoch, t.grad_accum, t.steps, t.epochs)
    optimizer = make_optimizer(model, t.lr, steps, t.warmup_steps, t.min_lr_ratio, t.weight_decay)
    start, data_state = resume_point(run_dir, "sft", model, optimizer, device, log) if resume else (0, None)
    if data_state:
        stream = BatchStream.from_state(train_set.examples, data_state, pad_id=pad)
    val = None
    if valid_set and valid_set.examples and t.val_batches:
        val_list = [sft_tensors(b, device)[0] for b in eval_batches(valid_set.examples, t.batch_size, pad_id=pad)]
        val = lambda: val_list[: t.val_batches]  # noqa: E731
    spec = LoopSpec(
        "sft",
        steps,
        t.grad_accum,
        t.max_grad_norm,
        t.steps_per_report,
        t.steps_per_eval,
        t.save_every,
        t.max_bad_steps,
        t.val_batches,
        config.memory.alert_threshold,
    )
    result = train_loop(
        model,
        optimizer,
        sft_loss_fn(t.loss_chunk_size),
        (sft_tensors(b, device) for b in stream),
        spec,
        run_dir,
        device,
        data_state=stream.state,
        val_batches=val,
        start_step=start,
        extra_report=lambda: {"padding_fraction": stream.padding_fraction},
    )
    summary = {
        "steps": result.steps_done,
        "final_loss": result.last_loss,
        "interrupted": result.interrupted,
        "padding_fraction": stream.padding_fraction,
        "examples": len(train_set.examples),
        "truncated": train_set.truncated,
        "dropped": train_set.dropped_overlong,
    }
    if not result.interrupted:
        atomic_write_text(run_dir / "sft_done.json", json.dumps(summary, indent=1))
    return summary


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
