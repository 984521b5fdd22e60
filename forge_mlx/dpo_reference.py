"""DPO's reference log-probs (Rafailov et al. 2023), backend-free: the policy as DPO starts scores every pair once,
and RUN/dpo_reference.safetensors keeps them under a fingerprint of the data and loss, so a resumed run reuses
them. With PiSSA, "disabling the adapter" leaves the residual, which is not the reference model."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import safe_open

from forge_mlx.config import Config
from forge_mlx.data.batching import eval_batches
from forge_mlx.phases import Phase, pair_ids
from forge_mlx.run_files import REFERENCE_FILE, real_rows, save_numpy_arrays

Score = Callable[[np.ndarray, np.ndarray], np.ndarray]  # tokens (R, T), loss mask (R, T) -> (R,) log-probs


def reference_logps(model, pairs: list, batch_size: int, pad_id: int, score: Score) -> dict[str, np.ndarray]:
    """Sequence log-probs of chosen and rejected under the current (starting) policy, per pair index; `score` is
    the backend's forward of `model`."""
    chosen = np.zeros(len(pairs), np.float32)
    rejected = np.zeros(len(pairs), np.float32)
    model.eval()
    for batch in eval_batches(pairs, batch_size, pad_id=pad_id):
        rows = real_rows(batch)
        ids = pair_ids(batch)
        logps = score(batch.tokens[rows], batch.loss_mask[rows])  # (2 * len(ids),)
        chosen[ids], rejected[ids] = logps[: len(ids)], logps[len(ids) :]
    model.train()
    return {"chosen": chosen, "rejected": rejected}


def cached_reference(
    run_dir: Path, name: str, fingerprint: dict, compute: Callable[[], dict[str, np.ndarray]], write: bool = True
) -> dict[str, np.ndarray]:
    """This split's reference log-probs from the run directory, or compute()d and saved (atomically, when `write`:
    under data parallelism every rank computes the same ones and rank 0 keeps them)."""
    path = Path(run_dir) / REFERENCE_FILE
    key = json.dumps(fingerprint, sort_keys=True)
    stored = {}
    if path.exists():
        with safe_open(str(path), "np") as handle:
            if (handle.metadata() or {}).get("fingerprint") == key:
                stored = {k: handle.get_tensor(k) for k in handle.keys()}
    if f"{name}.chosen" not in stored:
        stored.update({f"{name}.{k}": v for k, v in compute().items()})
        if write:
            save_numpy_arrays(path, stored, {"fingerprint": key})
    return {"chosen": stored[f"{name}.chosen"], "rejected": stored[f"{name}.rejected"]}


def phase_references(
    run_dir: Path,
    phase: Phase,
    config: Config,
    compute: Callable[[list, bool], dict[str, np.ndarray]],
    write: bool = True,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """(train, valid or None) reference log-probs of a DPO phase; compute(pairs, average) scores pairs with the
    policy (average: per-token means, for IPO). Taken before a resumed checkpoint loads: the reference is the
    policy as DPO starts."""
    average = config.dpo.loss == "ipo"
    fingerprint = {"train": phase.stream.fingerprint, "loss_average": average}
    train = cached_reference(run_dir, "train", fingerprint, lambda: compute(phase.train.examples, average), write)
    if not phase.validates(config.train.val_batches):
        return train, None
    valid = cached_reference(run_dir, "valid", fingerprint, lambda: compute(phase.valid.examples, average), write)
    return train, valid
