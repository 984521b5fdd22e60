"""The DPO phase in torch, as forge_mlx/dpo.py: reference log-probs of the starting policy computed once
and kept in RUN/dpo_reference.safetensors (forge_mlx/dpo_reference.py; the PiSSA residual alone is not the
reference), then the shared loop."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import torch

from forge_mlx import dpo_reference, phases
from forge_mlx.config import Config
from forge_mlx.run_files import real_rows
from forge_mlx.torch_backend.losses import dpo_loss, sequence_logps
from forge_mlx.torch_backend.pipeline import tensors, train_backend


def preference_tensors(batch, reference: dict[str, np.ndarray], device: torch.device):
    """(tokens (2b, T), mask (2b, T), ref_chosen (b,), ref_rejected (b,)) for the real pairs, and the real
    token count."""
    arrays, n_tokens = phases.preference_rows(batch, real_rows(batch), reference)
    return tensors(arrays, device), n_tokens


@torch.no_grad()
def reference_logps(
    model, pairs: list, batch_size: int, average: bool, pad_id: int, device: torch.device
) -> dict[str, np.ndarray]:
    """Sequence log-probs of chosen and rejected under the current (starting) policy, per pair index."""

    def score(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
        logps = sequence_logps(model, *tensors((tokens, mask), device), average=average)
        return logps.float().cpu().numpy()

    return dpo_reference.reference_logps(model, pairs, batch_size, pad_id, score)


def dpo_loss_fn(config: Config):
    return phases.dpo_loss_fn(config, sequence_logps, dpo_loss, lambda m: m.any(dim=1).sum().float())


def run_dpo(model, tokenizer, config: Config, run_dir: Path, resume: bool, device: torch.device, log=print) -> dict:
    dpo = phases.dpo_phase(config, tokenizer, log)
    score = lambda pairs, average: reference_logps(model, pairs, dpo.batch_size, average, dpo.pad, device)
    reference, valid_reference = dpo_reference.phase_references(run_dir, dpo, config, score)
    arrays = partial(preference_tensors, reference=reference, device=device)
    val_arrays = partial(preference_tensors, reference=valid_reference, device=device)
    return phases.train_phase(
        train_backend(model, device), model, dpo, dpo_loss_fn(config), arrays, val_arrays, config, run_dir, resume, log
    )
