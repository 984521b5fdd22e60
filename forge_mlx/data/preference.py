"""Preference pairs for DPO: prompt + chosen and prompt + rejected, masks over the completion part only."""

from __future__ import annotations

from typing import Any, NamedTuple

from forge_mlx.data.jsonl import Dataset, Record
from forge_mlx.data.sft import (
    NO_TEMPLATE_HINT,
    OVERLONG,
    EncodedSplit,
    SFTExample,
    chat_example,
    check_choice,
    checked_split,
    fit_length,
    has_chat_template,
    raw_example,
)
from forge_mlx.errors import ForgeError


class PreferencePair(NamedTuple):
    """Both sequences share the prompt tokens; each mask covers only its completion (SFT mask convention)."""

    chosen: SFTExample
    rejected: SFTExample


def encode_preference(example: Record, tokenizer: Any, *, use_chat_template: bool = True) -> PreferencePair:
    """Encode one preference row through the chat template (chat form always; string form when asked)."""
    if example.fmt != "preference":
        raise ForgeError(f"{example.fmt} rows are not preference data", where=example.where())
    data = example.data
    chat_form = isinstance(data["prompt"], list)
    if chat_form and not has_chat_template(tokenizer):
        raise ForgeError("the tokenizer has no chat template", where=example.where("prompt"), hint=NO_TEMPLATE_HINT)
    if not chat_form and not (use_chat_template and has_chat_template(tokenizer)):
        return PreferencePair(
            *(raw_example(tokenizer, data["prompt"], data[k], example) for k in ("chosen", "rejected"))
        )
    if chat_form:
        prompt, tools = data["prompt"], data["tools"]
        replies = data["chosen"], data["rejected"]
    else:
        prompt, tools = [{"role": "user", "content": data["prompt"]}], None
        replies = tuple([{"role": "assistant", "content": data[k]}] for k in ("chosen", "rejected"))
    return PreferencePair(*(chat_example(tokenizer, prompt + reply, tools, len(prompt), example) for reply in replies))


def encode_preference_split(
    dataset: Dataset,
    tokenizer: Any,
    *,
    max_seq_length: int,
    overlong: str = "truncate",
    use_chat_template: bool = True,
) -> EncodedSplit:
    """Encode every pair, apply the length policy to both sides and count what it did."""
    check_choice("overlong", overlong, OVERLONG)
    pairs, truncated, dropped, no_target = [], 0, 0, 0
    for record in dataset.records:
        pair = encode_preference(record, tokenizer, use_chat_template=use_chat_template)
        fitted = [fit_length(side, max_seq_length, overlong) for side in pair]
        if any(side is None for side in fitted):
            dropped += 1
        elif not all(any(mask) for _, mask in fitted):
            no_target += 1
        else:
            truncated += any(new is not old for new, old in zip(fitted, pair, strict=True))
            pairs.append(PreferencePair(*fitted))
    return checked_split(
        dataset, EncodedSplit(pairs, truncated, dropped, no_target, len(dataset.skipped)), max_seq_length
    )
