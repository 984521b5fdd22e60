"""The DPO phase in torch, as forge_mlx/dpo.py: reference log-probs of the starting policy computed once
and kept in RUN/dpo_reference.safetensors (the PiSSA residual alone is not the reference), then the shared
loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from forge_mlx.config import Config
from forge_mlx.data.batching import BatchStream, eval_batches
from forge_mlx.data.jsonl import load_split
from forge_mlx.data.preference import encode_preference_split
from forge_mlx.errors import ForgeError
from forge_mlx.loop_common import LoopSpec
from forge_mlx.run_files import REFERENCE_FILE, atomic_write_text, phase_steps, real_rows, save_numpy_arrays
from forge_mlx.torch_backend.losses import dpo_loss, sequence_logps
from forge_mlx.torch_backend.train import make_optimizer, resume_point, train_loop


def batch_tensors(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """tokens (R, T) and loss mask (R, T) of the real rows, and the pair ids they hold."""
    rows = real_rows(batch)
    ids = [ids[0] for ids in batch.example_ids if ids]
    tokens = torch.from_numpy(batch.tokens[rows]).long().to(device)
    return tokens, torch.from_numpy(batch.loss_mask[rows]).to(device), ids


def preference_tensors(batch, reference: dict[str, np.ndarray], device: torch.device):
    """(tokens (2b, T), mask (2b, T), ref_chosen (b,), ref_rejected (b,)) for the real pairs, and the real
    token count."""
    tokens, mask, ids = batch_tensors(batch, device)
    refs = tuple(torch.from_numpy(reference[side][ids]).to(device) for side in ("chosen", "rejected"))
    return (tokens, mask, *refs), int(batch.lengths[real_rows(batch)].sum())


@torch.no_grad()
def reference_logps(
    model, pairs: list, batch_size: int, average: bool, pad_id: int, device: torch.device
) -> dict[str, np.ndarray]:
    """Sequence log-probs of chosen and rejected under the current (starting) policy, per pair index."""
    chosen = np.zeros(len(pairs), np.float32)
    rejected = np.zeros(len(pairs), np.float32)
    model.eval()
    for batch in eval_batches(pairs, batch_size, pad_id=pad_id):
        tokens, mask, ids = batch_tensors(batch, device)
        logps = sequence_logps(model, tokens, mask, average=average).float().cpu().numpy()
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
    device: torch.device,
) -> dict[str, np.ndarray]:
    """This split's reference log-probs from the run directory, or computed and saved (atomically)."""
    path = Path(run_dir) / REFERENCE_FILE
    key = json.dumps(fingerprint, sort_keys=True)
    stored = {}
    if path.exists():
        with safe_open(str(path), "np") as handle:
            if (handle.metadata() or {}).get("fingerprint") == key:
                stored = {k: handle.get_tensor(k) for k in handle.keys()}
    if f"{name}.chosen" not in stored:
        fresh = reference_logps(model, pairs, batch_size, average, pad_id, device)
        stored.update({f"{name}.{k}": v for k, v in fresh.items()})
        save_numpy_arrays(path, stored, {"fingerprint": key})
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
        n = torch.tensor(float(pairs))
        return loss, n, {key: value * pairs for key, value in metrics.items()}

    return loss_fn


def run_dpo(model, tokenizer, config: Config, run_dir: Path, resume: bool, device: torch.device, log=print) -> dict:
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
    reference = cached_reference(
        run_dir, "train", model, train_set.examples, d.batch_size, average, pad, fingerprint, device
    )
    val = None
    if valid_set and valid_set.examples and config.train.val_batches:
        valid_ref = cached_reference(
            run_dir, "valid", model, valid_set.examples, d.batch_size, average, pad, fingerprint, device
        )
        val_list = [
            preference_tensors(b, valid_ref, device)[0]
            for b in eval_batches(valid_set.examples, d.batch_size, pad_id=pad)
        ]
        val = lambda: val_list[: config.train.val_batches]  # noqa: E731
    steps = phase_steps(stream.batches_per_epoch, d.grad_accum, d.steps, d.epochs)
    t = config.train
    optimizer = make_optimizer(model, d.lr, steps, d.warmup_steps, t.min_lr_ratio, t.weight_decay)
    start, data_state = resume_point(run_dir, "dpo", model, optimizer, device, log) if resume else (0, None)
    if data_state:
        stream = BatchStream.from_state(train_set.examples, data_state, pad_id=pad)
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
        (preference_tensors(b, reference, device) for b in stream),
        spec,
        run_dir,
        device,
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
    if not result.interrupted:
        atomic_write_text(run_dir / "dpo_done.json", json.dumps(summary, indent=1))
    return summary
