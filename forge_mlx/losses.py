"""Pure loss functions on mlx arrays: token log-probs, SFT negative log-likelihood, DPO-family losses."""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from forge_mlx.errors import ForgeError

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def hidden_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module, Callable[[mx.array], mx.array]]:
    """Split an mlx-lm causal LM into (body, head owner, head) so logits can be built a chunk at a time.

    body(tokens) -> (B, T, D) final-norm hidden state; head(h) -> (B, T, V) logits; the owner holds the head's
    parameters: `lm_head` when untied, else `embed_tokens` (tied, used through `as_linear`).
    """
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "embed_tokens"):
        raise ForgeError(
            f"model {type(model).__module__}.{type(model).__name__} has no `.model.embed_tokens`",
            hint="forge-mlx supports mlx-lm decoder models laid out like mlx_lm.models.llama",
        )
    lm_head = getattr(model, "lm_head", None)
    if lm_head is not None:
        return body, lm_head, lm_head
    return body, body.embed_tokens, body.embed_tokens.as_linear


def _target_logps(head: Callable[[mx.array], mx.array], h: mx.array, targets: mx.array) -> mx.array:
    """log softmax(head(h))[targets] in fp32; (B, C, D), (B, C) -> (B, C)."""
    logits = head(h).astype(mx.float32)  # (B, C, V)
    picked = mx.take_along_axis(logits, mx.stop_gradient(targets)[..., None], axis=-1).squeeze(-1)  # (B, C)
    return picked - mx.logsumexp(logits, axis=-1)


def token_logps(model: nn.Module, tokens: mx.array, *, chunk_size: int | None = None) -> mx.array:
    """(B, T) tokens -> (B, T-1) log p(tokens[:, 1:] | prefix), log-softmax in fp32.

    With `chunk_size`, logits are built `chunk_size` positions at a time under gradient checkpointing: no op
    needs the full (B, T, V) logits, forward or backward (the backward recomputes each chunk's logits).
    """
    body, owner, head = hidden_and_head(model)
    h = body(tokens[:, :-1])  # (B, T-1, D)
    targets = tokens[:, 1:]  # (B, T-1)
    if chunk_size is None:
        return _target_logps(head, h, targets)
    if chunk_size < 1:
        raise ForgeError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    step = nn.utils.checkpoint(owner, lambda hc, tc: _target_logps(head, hc, tc))
    n = h.shape[1]
    chunks = [step(h[:, i : i + chunk_size], targets[:, i : i + chunk_size]) for i in range(0, n, chunk_size)]
    return mx.concatenate(chunks, axis=1)  # (B, T-1)


def sft_loss(
    model: nn.Module, tokens: mx.array, loss_mask: mx.array, *, chunk_size: int | None = None
) -> tuple[mx.array, mx.array]:
    """Mean NLL over supervised target tokens (like mlx-lm's default_loss, with an explicit completion mask).

    `loss_mask` is (B, T) aligned with `tokens` (1 = supervised): target tokens[:, t] gets weight mask[:, t].
    Returns (loss, n_tokens); a batch with no supervised token gives loss 0, not NaN.
    """
    logps = token_logps(model, tokens, chunk_size=chunk_size)  # (B, T-1)
    mask = loss_mask[:, 1:].astype(mx.float32)  # (B, T-1)
    n_tokens = mask.sum()
    return -(logps * mask).sum() / mx.maximum(n_tokens, 1.0), n_tokens


def sequence_logps(
    model: nn.Module,
    tokens: mx.array,
    loss_mask: mx.array,
    *,
    average: bool = False,
    chunk_size: int | None = None,
) -> mx.array:
    """(B,) sum of completion-token log-probs (DPO), or their per-token mean (`average`, for IPO)."""
    logps = token_logps(model, tokens, chunk_size=chunk_size)  # (B, T-1)
    mask = loss_mask[:, 1:].astype(mx.float32)  # (B, T-1)
    total = (logps * mask).sum(axis=1)  # (B,)
    return total / mx.maximum(mask.sum(axis=1), 1.0) if average else total


def dpo_loss(
    policy_chosen: mx.array,
    policy_rejected: mx.array,
    ref_chosen: mx.array,
    ref_rejected: mx.array,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[mx.array, dict[str, mx.array]]:
    """Preference loss on (B,) sequence log-probs, formulas and metric names as TRL's DPOTrainer.dpo_loss.

    sigmoid: DPO, Rafailov et al. 2023 (arXiv:2305.18290) Eq. 7, with cDPO label smoothing (Mitchell 2023);
    ipo: Azar et al. 2023 (arXiv:2310.12036) Eq. 17, pass per-token AVERAGED log-probs; hinge: RSO, Liu et al.
    2023 (arXiv:2309.06657); robust: Chowdhury et al. 2024 (arXiv:2403.00409), unbiased under flipped labels.
    """
    _check_dpo_args(beta, loss_type, label_smoothing)
    ls = label_smoothing
    chosen_ratio = policy_chosen - ref_chosen  # (B,) log pi/pi_ref on the chosen completion
    rejected_ratio = policy_rejected - ref_rejected  # (B,)
    logits = chosen_ratio - rejected_ratio  # (B,)
    if loss_type == "sigmoid":
        losses = -nn.log_sigmoid(beta * logits) * (1 - ls) - nn.log_sigmoid(-beta * logits) * ls
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = nn.relu(1 - beta * logits)
    else:
        losses = (-nn.log_sigmoid(beta * logits) * (1 - ls) + nn.log_sigmoid(-beta * logits) * ls) / (1 - 2 * ls)
    chosen_rewards = mx.stop_gradient(beta * chosen_ratio)  # (B,)
    rejected_rewards = mx.stop_gradient(beta * rejected_ratio)  # (B,)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).astype(mx.float32).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": mx.stop_gradient(policy_chosen).mean(),
        "logps/rejected": mx.stop_gradient(policy_rejected).mean(),
    }
    return losses.mean(), metrics


def _check_dpo_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    """Reject settings that would silently be ignored or divide by zero."""
    if loss_type not in DPO_LOSS_TYPES:
        raise ForgeError(f"unknown DPO loss_type '{loss_type}'", hint=f"use one of {', '.join(DPO_LOSS_TYPES)}")
    if beta <= 0:
        raise ForgeError(f"DPO beta must be > 0, got {beta}", hint="typical values are 0.1 to 0.5")
    if loss_type in ("ipo", "hinge") and label_smoothing != 0:
        raise ForgeError(
            f"label_smoothing={label_smoothing} has no effect with loss_type '{loss_type}'",
            hint="set it to 0, or use loss_type 'sigmoid' or 'robust'",
        )
    if not 0 <= label_smoothing < 0.5:
        raise ForgeError(
            f"label_smoothing must lie in [0, 0.5), got {label_smoothing}",
            hint="it is the assumed fraction of flipped preference labels",
        )
