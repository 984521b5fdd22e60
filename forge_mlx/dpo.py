"""The DPO phase (Rafailov et al. 2023): reference log-probs precomputed once, then the shared training loop.

The reference is the policy as DPO starts (base + SFT adapters over the quantized residual). With PiSSA,
"disabling the adapter" leaves the residual, which is not the reference model, so we never do that: the
reference log-probs are computed from the starting policy before the first update and kept in the run
directory (forge_mlx/dpo_reference.py), and a DPO step costs the policy's chosen + rejected passes only, with
one model in memory.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import mlx.core as mx
import numpy as np

from forge_mlx import distributed as dist
from forge_mlx import dpo_reference, phases
from forge_mlx.config import Config
from forge_mlx.losses import dpo_loss, sequence_logps
from forge_mlx.pipeline import local_rows, train_backend
from forge_mlx.run_files import REFERENCE_FILE  # noqa: F401  (tests find the reference file through this module)


def preference_arrays(batch, reference: dict[str, np.ndarray]) -> tuple[tuple[mx.array, ...], int]:
    """(tokens (2b, T), mask (2b, T), ref_chosen (b,), ref_rejected (b,)) for the real pairs of a batch."""
    arrays, n_tokens = phases.preference_rows(*local_rows(batch), reference)
    return tuple(mx.array(a) for a in arrays), n_tokens


def reference_logps(model, pairs: list, batch_size: int, average: bool, pad_id: int) -> dict[str, np.ndarray]:
    """Sequence log-probs of chosen and rejected under the current (starting) policy, per pair index."""

    def score(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.array(sequence_logps(model, mx.array(tokens), mx.array(mask), average=average))

    return dpo_reference.reference_logps(model, pairs, batch_size, pad_id, score)


def dpo_loss_fn(config: Config):
    return phases.dpo_loss_fn(config, sequence_logps, dpo_loss, lambda m: m.any(axis=1).sum().astype(mx.float32))


def run_dpo(model, tokenizer, config: Config, run_dir: Path, resume: bool, log=print) -> dict:
    dpo = phases.dpo_phase(config, tokenizer, log)
    score = lambda pairs, average: reference_logps(model, pairs, dpo.batch_size, average, dpo.pad)
    reference, valid_reference = dpo_reference.phase_references(run_dir, dpo, config, score, write=dist.is_main())
    arrays = partial(preference_arrays, reference=reference)
    val_arrays = partial(preference_arrays, reference=valid_reference)
    return phases.train_phase(
        train_backend(model), model, dpo, dpo_loss_fn(config), arrays, val_arrays, config, run_dir, resume, log
    )
