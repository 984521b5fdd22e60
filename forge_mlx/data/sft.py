"""SFT encoding: token ids plus a loss mask that supervises exactly what the model should learn to write.

Mask convention (shared by every backend): loss_mask[t] is True when token t is a training target, predicted
from tokens < t; so token 0 is never a target, and the loss pairs logits[:, :-1] with tokens[:, 1:].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

from forge_mlx.data.jsonl import Dataset, Record
from forge_mlx.errors import ForgeError

SFTExample = tuple[list[int], list[bool]]  # (tokens, loss_mask), equal lengths
SUPERVISE = ("all_assistant", "last_assistant")
OVERLONG = ("truncate", "drop")
NO_TEMPLATE_HINT = (
    "use {prompt, completion} rows with use_chat_template off, or give the tokenizer a chat template "
    "(tokenizer.chat_template = ...)"
)


@dataclass(frozen=True)
class EncodedSplit:
    """Encoded examples plus what length handling did, so a run can report what it trains on."""

    examples: list  # SFTExample for SFT, PreferencePair for preference data
    truncated: int  # examples cut to max_seq_length
    dropped_overlong: int  # examples over max_seq_length removed (overlong="drop")
    dropped_no_target: int  # examples left with no supervised token (e.g. the prompt fills max_seq_length)
    skipped_rows: int  # bad rows the reader skipped (skip_bad_rows)


def encode_sft(
    example: Record,
    tokenizer: Any,
    *,
    mask_prompt: bool = True,
    supervise: str = "all_assistant",
    use_chat_template: bool = True,
) -> SFTExample:
    """Tokens and loss mask for one SFT row; each assistant turn (with its end-of-turn) is supervised."""
    check_choice("supervise", supervise, SUPERVISE)
    data = example.data
    if example.fmt == "text":
        tokens = tokenizer.encode(data["text"])
        eos = eos_id(tokenizer, example)
        tokens = tokens if tokens and tokens[-1] == eos else [*tokens, eos]
        return tokens, _all_targets(len(tokens))
    if example.fmt not in ("chat", "completions"):
        raise ForgeError(f"{example.fmt} rows are not SFT data", where=example.where())
    if example.fmt == "completions" and not (use_chat_template and has_chat_template(tokenizer)):
        tokens, mask = raw_example(tokenizer, data["prompt"], data["completion"], example)
    else:
        messages, tools = data.get("messages"), data.get("tools")
        if example.fmt == "completions":
            messages = [
                {"role": "user", "content": data["prompt"]},
                {"role": "assistant", "content": data["completion"]},
            ]
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        first = assistants[-1] if supervise == "last_assistant" else assistants[0]
        tokens, mask = chat_example(tokenizer, messages, tools, first, example)
    return tokens, (mask if mask_prompt else _all_targets(len(tokens)))


def _all_targets(n: int) -> list[bool]:
    return [False] + [True] * (n - 1)


def chat_example(tokenizer: Any, messages: list[dict], tools: list | None, first: int, example: Record) -> SFTExample:
    """Render through the chat template and supervise the assistant turns at index >= `first`.

    Each turn's span is found by rendering the conversation prefix by prefix: the span runs from the end of
    messages[:i] + generation prompt to the end of messages[:i+1], cut after its last special token (the
    end-of-turn, e.g. <|im_end|>), so the template's trailing newline is not a target.
    """
    if not has_chat_template(tokenizer):
        raise ForgeError("the tokenizer has no chat template", where=example.where("messages"), hint=NO_TEMPLATE_HINT)
    full = render_chat(tokenizer, messages, tools, False, example)
    mask = [False] * len(full)
    stops = end_of_turn_ids(tokenizer)
    for i in range(first, len(messages)):
        if messages[i]["role"] != "assistant":
            continue
        start = len(_prefix(tokenizer, messages[:i], tools, True, full, example, i))
        end = len(_prefix(tokenizer, messages[: i + 1], tools, False, full, example, i))
        last_stop = max((t for t in range(start, end) if full[t] in stops), default=end - 1)
        mask[start : last_stop + 1] = [True] * (last_stop + 1 - start)
    mask[0] = False
    return full, mask


def _prefix(tokenizer, messages, tools, add_generation_prompt, full, example, turn) -> list[int]:
    tokens = render_chat(tokenizer, messages, tools, add_generation_prompt, example)
    if tokens != full[: len(tokens)]:
        raise ForgeError(
            f"the chat template's render up to messages[{turn}] is not a prefix of the whole conversation's, "
            "so its assistant span cannot be located",
            where=example.where("messages"),
            hint="set supervise: last_assistant, or use {prompt, completion} rows",
        )
    return tokens


def render_chat(
    tokenizer: Any, messages: list[dict], tools: list | None, add_generation_prompt: bool, example: Record
) -> list[int]:
    """Token ids of the chat template render; takes a PreTrainedTokenizerFast or mlx-lm's TokenizerWrapper."""
    # mlx-lm's wrapper forces return_dict=False itself and may hold a custom renderer that rejects it
    extra = {} if _is_mlx_wrapper(tokenizer) else {"return_dict": False}
    try:
        out = tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=True, **extra
        )
    except TemplateError as err:
        raise ForgeError(
            f"the chat template rejects this conversation: {err}", where=example.where("messages")
        ) from err
    return [int(t) for t in (out["input_ids"] if isinstance(out, dict) else out)]


def raw_example(tokenizer: Any, prompt: str, completion: str, example: Record) -> SFTExample:
    """Prompt (with the tokenizer's BOS, masked) followed by completion + EOS (supervised), no template."""
    prompt_ids = tokenizer.encode(prompt)
    completion_ids = [*tokenizer.encode(completion, add_special_tokens=False), eos_id(tokenizer, example)]
    return prompt_ids + completion_ids, [False] * len(prompt_ids) + [True] * len(completion_ids)


def has_chat_template(tokenizer: Any) -> bool:
    if _is_mlx_wrapper(tokenizer):
        return bool(tokenizer.has_chat_template)
    return getattr(tokenizer, "chat_template", None) is not None


def end_of_turn_ids(tokenizer: Any) -> frozenset[int]:
    """Special tokens that can close a turn: every special added token and EOS, but not UNK."""
    special = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    special.discard(tokenizer.unk_token_id)
    if tokenizer.eos_token_id is not None:
        special.add(tokenizer.eos_token_id)
    return frozenset(special)


def eos_id(tokenizer: Any, example: Record) -> int:
    if tokenizer.eos_token_id is None:
        raise ForgeError(
            "the tokenizer has no EOS token to end the sequence with",
            where=example.where(),
            hint="set tokenizer.eos_token, or use chat rows with a chat template",
        )
    return tokenizer.eos_token_id


def fit_length(example: SFTExample, max_seq_length: int, overlong: str) -> SFTExample | None:
    """Cut an example to max_seq_length tokens ("truncate") or return None ("drop") when it is longer."""
    tokens, mask = example
    if len(tokens) <= max_seq_length:
        return example
    return (tokens[:max_seq_length], mask[:max_seq_length]) if overlong == "truncate" else None


def encode_sft_split(
    dataset: Dataset,
    tokenizer: Any,
    *,
    max_seq_length: int,
    overlong: str = "truncate",
    mask_prompt: bool = True,
    supervise: str = "all_assistant",
    use_chat_template: bool = True,
) -> EncodedSplit:
    """Encode every row of an SFT file, apply the length policy and count what it did."""
    check_choice("overlong", overlong, OVERLONG)
    examples, truncated, dropped, no_target = [], 0, 0, 0
    for record in dataset.records:
        example = encode_sft(
            record,
            tokenizer,
            mask_prompt=mask_prompt,
            supervise=supervise,
            use_chat_template=use_chat_template,
        )
        fitted = fit_length(example, max_seq_length, overlong)
        if fitted is None:
            dropped += 1
        elif not any(fitted[1]):
            no_target += 1
        else:
            truncated += fitted is not example
            examples.append(fitted)
    return checked_split(
        dataset, EncodedSplit(examples, truncated, dropped, no_target, len(dataset.skipped)), max_seq_length
    )


def checked_split(dataset: Dataset, split: EncodedSplit, max_seq_length: int) -> EncodedSplit:
    """The split, unless the length policy left nothing of a non-empty file: then an error naming both."""
    if split.examples or not dataset.records:
        return split
    raise ForgeError(
        f"no example fits data.max_seq_length={max_seq_length}: {split.dropped_overlong} were longer and "
        f"dropped, {split.dropped_no_target} kept no supervised token",
        where=str(dataset.path),
        hint="raise data.max_seq_length"
        + (", or set data.overlong: truncate" if split.dropped_overlong else " (the prompts alone fill it)"),
    )


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ForgeError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _is_mlx_wrapper(tokenizer: Any) -> bool:
    """mlx_lm.tokenizer_utils.TokenizerWrapper, recognised without importing mlx."""
    return type(tokenizer).__name__ == "TokenizerWrapper" and hasattr(tokenizer, "_detokenizer")
