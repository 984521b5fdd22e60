"""Losses in torch with the meaning of forge_mlx/losses.py: token log-probs, SFT NLL, DPO-family losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from forge_mlx.errors import ForgeError


def _target_logps(head: nn.Module, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(head(h))[targets] in fp32; (B, C, D), (B, C) -> (B, C)."""
    logits = head(h).float()  # (B, C, V)
    picked = logits.gather(-1, targets[..., None]).squeeze(-1)  # (B, C)
    return picked - torch.logsumexp(logits, dim=-1)


def token_logps(model: nn.Module, tokens: torch.Tensor, *, chunk_size: int | None = None) -> torch.Tensor:
    """(B, T) tokens -> (B, T-1) log p(tokens[:, 1:] | prefix), log-softmax in fp32.

    The body is the model's `.model` (final-norm hidden states), the head its output embedding (tied or not).
    With `chunk_size`, logits are built that many positions at a time under checkpointing, so no op holds the
    full (B, T, V) logits, forward or backward.
    """
    body, head = getattr(model, "model", None), model.get_output_embeddings()
    if body is None or head is None:
        raise ForgeError(
            f"model {type(model).__name__} has no `.model` body and output embedding",
            hint="forge-mlx supports decoder models laid out like transformers' LlamaForCausalLM",
        )
    h = body(input_ids=tokens[:, :-1], use_cache=False).last_hidden_state  # (B, T-1, D)
    targets = tokens[:, 1:].long()  # (B, T-1)
    if chunk_size is None:
        return _target_logps(head, h, targets)
    if chunk_size < 1:
        raise ForgeError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    n = h.shape[1]
    chunks = [
        checkpoint(_target_logps, head, h[:, i : i + chunk_size], targets[:, i : i + chunk_size], use_reentrant=False)
        for i in range(0, n, chunk_size)
    ]
    return torch.cat(chunks, dim=1)  # (B, T-1)


def sft_loss(
    model: nn.Module, tokens: torch.Tensor, loss_mask: torch.Tensor, *, chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL over supervised target tokens; `loss_mask` (B, T) is aligned with `tokens` (1 = target).

    Returns (loss, n_tokens); a batch with no supervised token gives loss 0, not NaN.
    """
    logps = token_logps(model, tokens, chunk_size=chunk_size)  # (B, T-1)
    mask = loss_mask[:, 1:].float()  # (B, T-1)
    n_tokens = mask.sum()
    return -(logps * mask).sum() / n_tokens.clamp_min(1.0), n_tokens


def sequence_logps(
    model: nn.Module,
    tokens: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    average: bool = False,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """(B,) sum of completion-token log-probs (DPO), or their per-token mean (`average`, for IPO)."""
    logps = token_logps(model, tokens, chunk_size=chunk_size)  # (B, T-1)
    mask = loss_mask[:, 1:].float()  # (B, T-1)
    total = (logps * mask).sum(dim=1)  # (B,)
    return total / mask.sum(dim=1).clamp_min(1.0) if average else total


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Preference loss on (B,) sequence log-probs, formulas and metric names as TRL's DPOTrainer.dpo_loss.

    sigmoid: DPO, Rafailov et al. 2023 (arXiv:2305.18290) Eq. 7, with cDPO label smoothing; ipo: Azar et al.
    2023 (arXiv:2310.12036) Eq. 17 on per-token AVERAGED log-probs; hinge: RSO, Liu et al. 2023
    (arXiv:2309.06657); robust: Chowdhury et al. 2024 (arXiv:2403.00409). The config checks beta, loss_type
    and label_smoothing.
    """
    ls = label_smoothing
    chosen_ratio = policy_chosen - ref_chosen  # (B,) log pi/pi_ref on the chosen completion
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    logits = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * logits)
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - ls) + F.logsigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    else:
        raise ForgeError(f"unknown DPO loss_type '{loss_type}'", hint="use sigmoid, ipo, hinge or robust")
    chosen_rewards = (beta * chosen_ratio).detach()  # (B,)
    rejected_rewards = (beta * rejected_ratio).detach()  # (B,)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return losses.mean(), metrics
