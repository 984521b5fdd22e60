"""Greedy replies to held-out prompts, batched through mlx-lm, graded against each row's reference answer."""

from __future__ import annotations

from typing import Any, NamedTuple

import mlx.nn as nn

from forge_mlx.data.jsonl import Dataset, Record
from forge_mlx.data.sft import has_chat_template, render_chat
from forge_mlx.errors import ForgeError


class Prompt(NamedTuple):
    """A row's prompt tokens (the conversation up to its last assistant turn) and the reply to match."""

    tokens: list[int]
    reference: str
    text: str  # the user's question, for the report


def generation_prompt(record: Record, tokenizer: Any, *, use_chat_template: bool = True) -> Prompt:
    """Chat rows: every message before the last assistant one, with the generation prompt; completion rows:
    the prompt through the chat template when there is one (as SFT encodes it), else the raw prompt."""
    data = record.data
    if record.fmt == "chat":
        messages = data["messages"]
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = messages[:last]
        question = next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")
        tokens = render_chat(tokenizer, prompt, data.get("tools"), True, record)
        return Prompt(tokens, messages[last]["content"], question)
    if record.fmt == "completions":
        if use_chat_template and has_chat_template(tokenizer):
            tokens = render_chat(tokenizer, [{"role": "user", "content": data["prompt"]}], None, True, record)
        else:
            tokens = tokenizer.encode(data["prompt"])
        return Prompt(tokens, data["completion"], data["prompt"])
    raise ForgeError(
        f"{record.fmt} rows hold no reference answer to generate against",
        where=record.where(),
        hint="use chat or {prompt, completion} rows for the generate measure",
    )


def generation_prompts(dataset: Dataset, tokenizer: Any, *, use_chat_template: bool = True) -> list[Prompt]:
    return [generation_prompt(r, tokenizer, use_chat_template=use_chat_template) for r in dataset.records]


def greedy_replies(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    *,
    max_tokens: int = 32,
    batch_size: int = 8,
    batched: bool = True,
) -> list[str]:
    """Greedy (argmax) replies, stopping at the tokenizer's EOS tokens; `batched` pads prompts and decodes
    `batch_size` at a time with mlx-lm's batch_generate, else one prompt at a time with mlx-lm's generate."""
    from mlx_lm.generate import batch_generate, generate

    if not prompts:
        return []
    if not batched:
        return [generate(model, tokenizer, prompt, max_tokens=max_tokens) for prompt in prompts]
    response = batch_generate(
        model,
        tokenizer,
        prompts,
        max_tokens=max_tokens,
        completion_batch_size=batch_size,
        prefill_batch_size=batch_size,
    )
    return list(response.texts)
