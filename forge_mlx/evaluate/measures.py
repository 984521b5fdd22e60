"""Pure evaluation measures on numbers, strings and log-prob arrays, shared by the MLX and torch backends."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation

import numpy as np

from forge_mlx.errors import ForgeError

EXTRACTORS = ("exact", "last-number", "first-line")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def completion_loss(batch_losses: Sequence[float], batch_tokens: Sequence[float]) -> float:
    """Token-weighted mean of per-batch mean losses: each supervised token counts once, whatever its batch."""
    total = float(np.dot(np.asarray(batch_losses, np.float64), np.asarray(batch_tokens, np.float64)))
    n_tokens = float(np.sum(batch_tokens))
    if n_tokens <= 0:
        raise ForgeError("no supervised tokens to evaluate", hint="check the data and max_seq_length")
    return total / n_tokens


def perplexity(mean_loss: float) -> float:
    """exp(mean per-token NLL); inf rather than an overflow error for a model that is hopelessly wrong."""
    return math.exp(mean_loss) if mean_loss < 709 else math.inf


def normalise(text: str) -> str:
    """Case-folded, whitespace collapsed, one trailing period dropped: "Paris." and " paris" compare equal."""
    text = " ".join(text.split()).casefold()
    return text[:-1].rstrip() if text.endswith(".") else text


def extract(text: str, extractor: str = "exact") -> str | None:
    """The part of a reply that is graded; None when the extractor finds nothing (never a match)."""
    if extractor == "exact":
        return normalise(text)
    if extractor == "first-line":
        return next((normalise(line) for line in text.splitlines() if line.strip()), None)
    if extractor == "last-number":
        numbers = _NUMBER.findall(text)
        if not numbers:
            return None
        try:
            value = Decimal(numbers[-1].replace(",", "")).normalize()
        except InvalidOperation:
            return None
        return format(value, "f")  # "1,000" -> "1000", "3.50" -> "3.5"
    raise ForgeError(f"unknown extractor '{extractor}'", hint=f"use one of {', '.join(EXTRACTORS)}")


def matches(predictions: Sequence[str], references: Sequence[str], extractor: str = "exact") -> list[bool]:
    """Per-example exact match of the extracted prediction against the extracted reference."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    graded = [(extract(p, extractor), extract(r, extractor)) for p, r in zip(predictions, references, strict=True)]
    return [p is not None and p == r for p, r in graded]


def exact_match(predictions: Sequence[str], references: Sequence[str], extractor: str = "exact") -> float:
    """Fraction of predictions that match their reference after extraction and normalisation."""
    hits = matches(predictions, references, extractor)
    return sum(hits) / len(hits) if hits else math.nan


def preference_accuracy(chosen: np.ndarray, rejected: np.ndarray) -> float:
    """Fraction of pairs whose chosen completion has the higher summed log-prob (ties count as wrong)."""
    return float(np.mean(np.asarray(chosen) > np.asarray(rejected)))


def reward_margins(
    policy_chosen: np.ndarray,
    policy_rejected: np.ndarray,
    ref_chosen: np.ndarray,
    ref_rejected: np.ndarray,
    beta: float,
) -> np.ndarray:
    """(N,) DPO implicit reward margins beta * ((pc - rc) - (pr - rr)), Rafailov et al. 2023 Eq. 5."""
    pc, pr, rc, rr = (np.asarray(a, np.float64) for a in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    return beta * ((pc - rc) - (pr - rr))


def preference_scores(
    chosen: np.ndarray,
    rejected: np.ndarray,
    ref_chosen: np.ndarray | None = None,
    ref_rejected: np.ndarray | None = None,
    beta: float = 0.1,
) -> dict[str, float]:
    """Log-prob accuracy and mean margin; with a reference, DPO reward accuracy and mean reward margin too."""
    scores = {
        "preference_accuracy": preference_accuracy(chosen, rejected),
        "logp_margin": float(np.mean(np.asarray(chosen, np.float64) - np.asarray(rejected, np.float64))),
    }
    if ref_chosen is not None and ref_rejected is not None:
        margins = reward_margins(chosen, rejected, ref_chosen, ref_rejected, beta)
        scores["reward_accuracy"] = float(np.mean(margins > 0))
        scores["reward_margin"] = float(np.mean(margins))
    return scores
