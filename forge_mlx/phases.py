"""The backend-free half of `forge-mlx train`: the adapter options a config asks for, each phase's encoded
splits, numpy batch stream, validation batches and summary file, and train_phase, which drives a backend's
optimizer, resume and loop functions over them. A backend turns the numpy batches into its own arrays and runs
its loop; both then train on the same data and write the same files."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from forge_mlx.config import AdapterConfig, Config
from forge_mlx.data.batching import Batch, BatchStream, eval_batches
from forge_mlx.data.jsonl import load_split
from forge_mlx.data.preference import encode_preference_split
from forge_mlx.data.sft import EncodedSplit, encode_sft_split
from forge_mlx.errors import ForgeError
from forge_mlx.loop_common import LoopResult, loop_spec
from forge_mlx.metrics_log import drop_metrics_after
from forge_mlx.run_files import atomic_write_text, latest_good, list_checkpoints, phase_steps, verify


def quant_options(a: AdapterConfig) -> dict:
    """The residual storage settings make_residual takes (the backend adds its dtype)."""
    return dict(group_size=a.group_size, bits=a.bits, blocksize=a.blocksize, double_quant=a.double_quant)


def adapter_options(config: Config, log=print) -> dict:
    """apply_adapters' keyword arguments for the config (the backend adds dtype), logging every 10th layer."""
    a = config.adapter
    done = {"n": 0}

    def progress(path: str, entry: dict) -> None:
        done["n"] += 1
        if done["n"] == 1 or done["n"] % 10 == 0:
            log(f"  init {done['n']} layers ({path}: {entry['seconds']:.2f} s)")

    return dict(
        targets=a.targets,
        rank=a.rank,
        alpha=a.alpha,
        init=a.init,
        residual=a.residual,
        rank_pattern=a.rank_pattern,
        seed=config.seed,
        on_layer=progress,
        qpissa_iters=a.qpissa_iters,
        oversample=a.oversample,
        dropout=a.dropout,
        **quant_options(a),
    )


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def sft_splits(config: Config, tokenizer, log=print) -> tuple[EncodedSplit, EncodedSplit | None]:
    """(train, valid or None) encoded SFT splits; a data folder without a named valid file may hold one."""
    d = config.data
    encode = dict(
        max_seq_length=d.max_seq_length, overlong=d.overlong, mask_prompt=d.mask_prompt, supervise=d.supervise
    )
    train_set = encode_sft_split(load_split(d.train, "train", kind="sft"), tokenizer, **encode)
    valid_source = d.valid or (d.train if Path(d.train).is_dir() else None)
    valid_data = load_split(valid_source, "valid", kind="sft", required=d.valid is not None) if valid_source else None
    valid_set = encode_sft_split(valid_data, tokenizer, **encode) if valid_data else None
    line = (
        f"SFT data: {len(train_set.examples)} examples (truncated {train_set.truncated}, dropped "
        f"{train_set.dropped_overlong} over max_seq_length, {train_set.dropped_no_target} with no target)"
    )
    return _logged(line, train_set, valid_set, log)


def preference_splits(config: Config, tokenizer, log=print) -> tuple[EncodedSplit, EncodedSplit | None]:
    """(train, valid or None) encoded preference pairs of dpo.data (a folder may hold a valid file)."""
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
    line = (
        f"DPO data: {len(train_set.examples)} pairs (skipped {train_set.skipped_rows} bad rows, dropped "
        f"{train_set.dropped_overlong} over max_seq_length)"
    )
    return _logged(line, train_set, valid_set, log)


def _logged(
    line: str, train: EncodedSplit, valid: EncodedSplit | None, log
) -> tuple[EncodedSplit, EncodedSplit | None]:
    """Log a phase's data line (with the valid split's size) and pass the splits on."""
    log(line + (f", valid {len(valid.examples)}" if valid else ""))
    return train, valid


@dataclass
class Phase:
    """One phase's data as numpy batches: its splits, the training stream (replaced on resume) and its step
    count."""

    name: str  # "sft" or "dpo": names checkpoints, metric records, the done file and the summary's fields
    train: EncodedSplit
    valid: EncodedSplit | None
    stream: BatchStream
    pad: int
    batch_size: int
    steps: int
    grad_accum: int
    lr: float
    warmup_steps: int

    def resume(self, data_state: dict | None) -> BatchStream:
        """The stream at a checkpoint's data position (unchanged without one)."""
        if data_state:
            self.stream = BatchStream.from_state(self.train.examples, data_state, pad_id=self.pad)
        return self.stream

    def extra_report(self) -> dict:
        """What a report record adds for this phase: SFT's padding share of the batches served so far."""
        return {"padding_fraction": self.stream.padding_fraction} if self.name == "sft" else {}

    def validates(self, val_batches: int) -> bool:
        return bool(self.valid and self.valid.examples and val_batches)

    def val_batches(self, n: int, convert: Callable[[Batch], tuple]) -> Callable[[], list[tuple]] | None:
        """The first n validation batches, converted once by the backend; None when there is no validation."""
        if not self.validates(n):
            return None
        batches = [convert(b) for b in eval_batches(self.valid.examples, self.batch_size, pad_id=self.pad)]
        return lambda: batches[:n]

    def finish(self, run_dir: Path, result: LoopResult, write: bool = True) -> dict:
        """The phase summary; written to RUN/<phase>_done.json (by the writing rank) unless interrupted."""
        summary = {"steps": result.steps_done, "final_loss": result.last_loss, "interrupted": result.interrupted}
        if self.name == "sft":
            summary["padding_fraction"] = self.stream.padding_fraction
            summary["examples"] = len(self.train.examples)
            summary["truncated"] = self.train.truncated
            summary["dropped"] = self.train.dropped_overlong
        else:
            summary["pairs"] = len(self.train.examples)
            summary["skipped_rows"] = self.train.skipped_rows
            reports = [r for r in result.history if "rewards/accuracies" in r or "val_rewards/accuracies" in r]
            if reports:
                summary["last_report"] = reports[-1]
        if not result.interrupted and write:
            atomic_write_text(Path(run_dir) / f"{self.name}_done.json", json.dumps(summary, indent=1))
        return summary


PISSA_LR_CEILING = 5e-5  # measured on SmolLM2 (README, "Learning rate"): 2e-4 diverged where 2e-5 and 5e-5 trained


def pissa_lr_note(init: str, lr: float) -> str | None:
    """A heads-up when PiSSA trains at a LoRA-sized lr: its adapters are the principal components themselves."""
    if not init.startswith("pissa") or lr <= PISSA_LR_CEILING:
        return None
    return (
        f"note: train.lr {lr:g} with PiSSA init; PiSSA usually wants 2e-5 to 5e-5 (the paper used 2e-5; on SmolLM2 "
        "2e-4 raised the validation loss), so watch val_loss or lower train.lr"
    )


def sft_phase(config: Config, tokenizer, log=print) -> Phase:
    """The SFT phase: data.* splits in train.batch_size batches, steps and optimizer settings from train.*."""
    t = config.train
    train_set, valid_set = sft_splits(config, tokenizer, log)
    if note := pissa_lr_note(config.adapter.init, t.lr):
        log(note)
    pad = pad_id(tokenizer)
    stream = BatchStream(
        train_set.examples, t.batch_size, seed=config.seed, max_seq_length=config.data.max_seq_length, pad_id=pad
    )
    steps = phase_steps(stream.batches_per_epoch, t.grad_accum, t.steps, t.epochs)
    return Phase("sft", train_set, valid_set, stream, pad, t.batch_size, steps, t.grad_accum, t.lr, t.warmup_steps)


def dpo_phase(config: Config, tokenizer, log=print) -> Phase:
    """The DPO phase: dpo.data pairs in dpo.batch_size batches, steps and optimizer settings from dpo.*."""
    d = config.dpo
    train_set, valid_set = preference_splits(config, tokenizer, log)
    pad = pad_id(tokenizer)
    stream = BatchStream(train_set.examples, d.batch_size, seed=config.seed, pad_id=pad)
    steps = phase_steps(stream.batches_per_epoch, d.grad_accum, d.steps, d.epochs)
    return Phase("dpo", train_set, valid_set, stream, pad, d.batch_size, steps, d.grad_accum, d.lr, d.warmup_steps)


@dataclass(frozen=True)
class TrainBackend:
    """A backend's training functions, bound to its model and device, as train_phase calls them."""

    make_optimizer: Callable  # (lr, steps, warmup_steps, min_lr_ratio, weight_decay) -> optimizer
    resume_point: Callable  # (run_dir, phase, model, optimizer, log) -> (step, data state or None), state loaded
    train_loop: Callable  # (model, optimizer, loss_fn, batches, spec, run_dir, **loop options) -> LoopResult
    write: bool = True  # whether this process writes the done file (data parallel: rank 0 alone)


def train_phase(
    backend: TrainBackend, model, phase: Phase, loss_fn, arrays, val_arrays, config: Config, run_dir, resume, log
) -> dict:
    """Train the adapters on a phase's batches (arrays(batch) -> (loss_fn's arrays, real tokens); val_arrays the
    same for validation), from its newest checkpoint when resuming; returns the phase summary."""
    t = config.train
    val = phase.val_batches(t.val_batches, lambda b: val_arrays(b)[0])
    optimizer = backend.make_optimizer(phase.lr, phase.steps, phase.warmup_steps, t.min_lr_ratio, t.weight_decay)
    start, data_state = backend.resume_point(run_dir, phase.name, model, optimizer, log) if resume else (0, None)
    stream = phase.resume(data_state)
    result = backend.train_loop(
        model,
        optimizer,
        loss_fn,
        (arrays(b) for b in stream),
        loop_spec(phase.name, phase.steps, phase.grad_accum, config),
        run_dir,
        data_state=stream.state,
        val_batches=val,
        start_step=start,
        extra_report=phase.extra_report,
    )
    return phase.finish(run_dir, result, write=backend.write)


def pair_ids(batch: Batch) -> list[int]:
    """The pair index of each real row of the chosen half (rows i and B + i hold pair ids[i])."""
    return [ids[0] for ids in batch.example_ids if ids]


def sft_rows(batch: Batch, rows: list[int]) -> tuple[tuple[np.ndarray, np.ndarray], int]:
    """(tokens (R, T), loss mask (R, T)) of `rows`, and their real token count."""
    return (batch.tokens[rows], batch.loss_mask[rows]), int(batch.lengths[rows].sum())


def preference_rows(
    batch: Batch, rows: list[int], reference: dict[str, np.ndarray]
) -> tuple[tuple[np.ndarray, ...], int]:
    """(tokens (2b, T), mask (2b, T), ref_chosen (b,), ref_rejected (b,)) of `rows`, and their real token
    count. A filler-only share (a data-parallel rank's part of an epoch's last batch) is one filler pair with
    reference 0: its mask has no target, so it gets a finite loss and zero weight."""
    ids = pair_ids(batch)
    if ids:
        chosen, rejected = reference["chosen"][ids], reference["rejected"][ids]
    else:
        chosen = rejected = np.zeros(len(rows) // 2, reference["chosen"].dtype)
    arrays = (batch.tokens[rows], batch.loss_mask[rows], chosen, rejected)
    return arrays, int(batch.lengths[rows].sum())


def sft_loss_fn(sft_loss: Callable, chunk_size: int | None) -> Callable:
    """The SFT micro-batch loss on a backend's sft_loss: (mean loss, target tokens as its weight, no metrics)."""

    def loss_fn(model, tokens, mask):
        loss, n_tokens = sft_loss(model, tokens, mask, chunk_size=chunk_size)
        return loss, n_tokens, {}

    return loss_fn


def dpo_loss_fn(
    config: Config, sequence_logps: Callable, dpo_loss: Callable, real_pairs: Callable[[Any], Any]
) -> Callable:
    """The DPO micro-batch loss on a backend's ops: (mean loss, real pairs as its weight, metrics summed over the
    pairs). real_pairs(chosen mask (b, T)) counts the rows with a target: a filler pair has none and weighs 0."""
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
        n = real_pairs(mask[:pairs])
        return loss, n, {key: value * n for key, value in metrics.items()}

    return loss_fn


def resume_checkpoint(run_dir: Path, phase: str, log=print, main: bool = True) -> tuple[Path | None, dict | None]:
    """(folder, record) of the newest good checkpoint of `phase`, naming any corrupted newer one; rank 0 drops the
    metrics records written after it (the resumed run writes those steps again)."""
    for path in list_checkpoints(run_dir, phase):
        if verify(path) is None:
            log(f"  checkpoint {path.name} is incomplete or corrupted (checksum); using an earlier one")
    path, record = latest_good(run_dir, phase)
    if path is not None and main:
        drop_metrics_after(Path(run_dir) / "metrics.jsonl", phase, record["step"])
    return path, record
