"""The DPO phase (Rafailov et al. 2023): reference log-probs precomputed once, then the shared training loop.

The reference is the policy as DPO starts (base + SFT adapters over the quantized residual). With PiSSA,
"disabling the adapter" leaves the residual, which is not the reference model, so we never do that: the
reference log-probs are computed from the starting policy before the first update and kept in the run
directory, and a DPO step costs the policy's chosen + rejected passes only, with one model in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np

from forge_mlx import checkpoint as ckpt
from forge_mlx import distributed as dist
from forge_mlx.adapters import adapter_weights
from forge_mlx.config import Config
from forge_mlx.data.batching import BatchStream, eval_batches
from forge_mlx.data.jsonl import load_split
from forge_mlx.data.preference import encode_preference_split
from forge_mlx.errors import ForgeError
from forge_mlx.losses import dpo_loss, sequence_logps
from forge_mlx.pipeline import local_rows, make_optimizer, resume_point
from forge_mlx.run_files import REFERENCE_FILE, phase_steps, real_rows
from forge_mlx.train import LoopSpec, train_loop


def preference_arrays(batch, reference: dict[str, np.ndarray]) -> tuple[tuple[mx.array, ...], int]:
    """(tokens (2b, T), mask (2b, T), ref_chosen (b,), ref_rejected (b,)) for the real pairs of a batch."""
    batch, rows = local_rows(batch)
    ids = [ids[0] for ids in batch.example_ids if ids]
    arrays = (
        mx.array(batch.tokens[rows]),
        mx.array(batch.loss_mask[rows]),
        mx.array(reference["chosen"][ids]),
        mx.array(reference["rejected"][ids]),
    )
    return arrays, int(batch.lengths[rows].sum())


def reference_logps(model, pairs: list, batch_size: int, average: bool, pad_id: int) -> dict[str, np.ndarray]:
    """Sequence log-probs of chosen and rejected under the current (starting) policy, per pair index."""
    chosen = np.zeros(len(pairs), np.float32)
    rejected = np.zeros(len(pairs), np.float32)
    model.eval()
    for batch in eval_batches(pairs, batch_size, pad_id=pad_id):
        rows = real_rows(batch)
        ids = [ids[0] for ids in batch.example_ids if ids]
        logps = sequence_logps(model, mx.array(batch.tokens[rows]), mx.array(batch.loss_mask[rows]), average=average)
        logps = np.array(logps)
        chosen[ids], rejected[ids] = logps[: len(ids)], logps[len(ids) :]
    model.train()
    return {"chosen": chosen, "rejected": rejected}


def cached_reference(
    run_dir: Path,
    name: str,
    model,
    pairs: list,
    batch_size: int,
    average: bool,
    pad_id: int,
    fingerprint: dict,
) -> dict[str, np.ndarray]:
    """Load this split's reference log-probs from the run directory, or compute and save them (atomically)."""
    path = Path(run_dir) / REFERENCE_FILE
    stored = {}
    if path.exists():
        arrays, meta = mx.load(str(path), return_metadata=True)
        if meta.get("fingerprint") == json.dumps(fingerprint, sort_keys=True):
            stored = {k: np.array(v) for k, v in arrays.items()}
    if f"{name}.chosen" not in stored:
        fresh = reference_logps(model, pairs, batch_size, average, pad_id)
        stored.update({f"{name}.{k}": v for k, v in fresh.items()})
        if not dist.is_main():  # every rank computes the same reference; rank 0 keeps it
            return fresh
        tmp = path.with_name(f".{path.name}.tmp.safetensors")
        ckpt.save_arrays(
            tmp,
            {k: mx.array(v) for k, v in stored.items()},
            {"fingerprint": json.dumps(fingerprint, sort_keys=True)},
        )
        tmp.replace(path)
    return {"chosen": stored[f"{name}.chosen"], "rejected": stored[f"{name}.rejected"]}


def dpo_loss_fn(config: Config):
    d = config.dpo
    average = d.loss == "ipo"  # IPO compares per-token averaged log-ratios

    def loss_fn(model, tokens, mask, ref_chosen, ref_rejected):
        logps = sequence_logps(model, tokens, mask, average=average, chunk_size=config.train.loss_chunk_size)
        pairs = ref_chosen.shape[0]
        loss, metrics = dpo_loss(
            logps[:pairs],
            logps[pairs:],
            ref_chosen,
            ref_rejected,
            beta=d.beta,
            loss_type=d.loss,
            label_smoothing=d.label_smoothing,
        )
        n = mx.array(pairs, mx.float32)
        return loss, n, {key: value * n for key, value in metrics.items()}

    return loss_fn


def run_dpo(model, tokenizer, config: Config, run_dir: Path, resume: bool, log=print) -> dict:
    d, data = config.dpo, config.data
    encode = dict(max_seq_length=data.max_seq_length, overlong=data.overlong)
    train_set = encode_preference_split(
        load_split(d.data, "train", kind="preference", skip_bad_rows=data.skip_bad_rows), tokenizer, **encode
    )
    if not train_set.examples:
        raise ForgeError("no usable preference pairs", where=str(d.data))
    valid_data = (
        load_split(d.data, "valid", kind="preference", skip_bad_rows=data.skip_bad_rows, required=False)
        if Path(d.data).is_dir()
        else None
    )
    valid_set = encode_preference_split(valid_data, tokenizer, **encode) if valid_data else None
    log(
        f"DPO data: {len(train_set.examples)} pairs (skipped {train_set.skipped_rows} bad rows, dropped "
        f"{train_set.dropped_overlong} over max_seq_length)"
        + (f", valid {len(valid_set.examples)}" if valid_set else "")
    )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    average = d.loss == "ipo"
    stream = BatchStream(train_set.examples, d.batch_size, seed=config.seed, pad_id=pad)
    fingerprint = {"train": stream.fingerprint, "loss_average": average}
    reference = cached_reference(run_dir, "train", model, train_set.examples, d.batch_size, average, pad, fingerprint)
    val = None
    if valid_set and valid_set.examples and config.train.val_batches:
        valid_ref = cached_reference(
            run_dir, "valid", model, valid_set.examples, d.batch_size, average, pad, fingerprint
        )
        val_list = [
            preference_arrays(b, valid_ref)[0] for b in eval_batches(valid_set.examples, d.batch_size, pad_id=pad)
        ]
        val = lambda: val_list[: config.train.val_batches]  # noqa: E731
    steps = phase_steps(stream.batches_per_epoch, d.grad_accum, d.steps, d.epochs)
    optimizer = make_optimizer(d.lr, steps, d.warmup_steps, config.train.min_lr_ratio, config.train.weight_decay)
    start, data_state = resume_point(run_dir, "dpo", model, optimizer, log) if resume else (0, None)
    if data_state:
        stream = BatchStream.from_state(train_set.examples, data_state, pad_id=pad)
    t = config.train
    spec = LoopSpec(
        "dpo",
        steps,
        d.grad_accum,
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
        dpo_loss_fn(config),
        (preference_arrays(b, reference) for b in stream),
        spec,
        run_dir,
        adapter_weights=lambda: adapter_weights(model),
        data_state=stream.state,
        val_batches=val,
        start_step=start,
    )
    summary = {
        "steps": result.steps_done,
        "final_loss": result.last_loss,
        "interrupted": result.interrupted,
        "pairs": len(train_set.examples),
        "skipped_rows": train_set.skipped_rows,
    }
    reports = [r for r in result.history if "rewards/accuracies" in r or "val_rewards/accuracies" in r]
    if reports:
        summary["last_report"] = reports[-1]
    if not result.interrupted and dist.is_main():
        ckpt.atomic_write_text(run_dir / "dpo_done.json", json.dumps(summary, indent=1))
    return summary
