"""Rebuild a byte-level BPE tokenizer (tokenizer.json + configs) from a GGUF's tokenizer.ggml.* metadata."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from forge_mlx.errors import ForgeError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
SPECIAL_IDS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}


def _byte_level() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)  # the GPT-2 regex, then bytes


# llama.cpp's `tokenizer.ggml.pre` -> the same split in `tokenizers` (llama-vocab.cpp's regex_exprs)
PRE_TOKENIZERS: dict[str, Callable[[], pre_tokenizers.PreTokenizer]] = {
    "gpt-2": _byte_level,
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()]),
}


def build_tokenizer(metadata: dict[str, Any], source: str) -> Tokenizer:
    """The tokenizer llama.cpp's vocab describes: BPE on tokens + merges, control tokens as specials."""
    model, pre = metadata.get("tokenizer.ggml.model"), metadata.get("tokenizer.ggml.pre")
    if model != "gpt2":
        raise ForgeError(f"tokenizer.ggml.model is '{model}'; only byte-level BPE ('gpt2') is supported", where=source)
    if pre not in PRE_TOKENIZERS:
        raise ForgeError(f"tokenizer.ggml.pre is '{pre}'; supported: {', '.join(PRE_TOKENIZERS)}", where=source)
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ForgeError("tokenizer.ggml.tokens holds duplicate tokens", where=source)
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = _post_processor(metadata, tokens)
    types = metadata.get("tokenizer.ggml.token_type", [])
    tokenizer.add_special_tokens(_added(tokens, types, CONTROL))
    tokenizer.add_tokens(_added(tokens, types, USER_DEFINED))  # matched whole, as llama.cpp does
    return tokenizer


def _added(tokens: list[str], types: list[int], kind: int) -> list[AddedToken]:
    special = kind == CONTROL
    return [AddedToken(tokens[i], special=special, normalized=False) for i, t in enumerate(types) if t == kind]


def _post_processor(metadata: dict[str, Any], tokens: list[str]) -> processors.PostProcessor:
    """ByteLevel offsets, plus a BOS prefix when the GGUF says llama.cpp adds one."""
    byte_level = processors.ByteLevel(trim_offsets=False)
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    if not metadata.get("tokenizer.ggml.add_bos_token", False) or bos_id is None:
        return byte_level
    bos = tokens[bos_id]
    template = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
    )
    return processors.Sequence([byte_level, template])


def special_tokens(metadata: dict[str, Any]) -> dict[str, Any]:
    """bos/eos/unk/pad strings the GGUF names by id, and every control token as an additional special."""
    tokens = metadata["tokenizer.ggml.tokens"]
    named = {
        name: tokens[metadata[f"tokenizer.ggml.{key}_token_id"]]
        for name, key in SPECIAL_IDS.items()
        if f"tokenizer.ggml.{key}_token_id" in metadata
    }
    types = metadata.get("tokenizer.ggml.token_type", [])
    return {**named, "additional_special_tokens": [tokens[i] for i, t in enumerate(types) if t == CONTROL]}


def write_tokenizer(metadata: dict[str, Any], folder: Path, source: str) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for PreTrainedTokenizerFast."""
    build_tokenizer(metadata, source).save(str(folder / "tokenizer.json"))
    specials = special_tokens(metadata)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": metadata["llama.context_length"],
        "clean_up_tokenization_spaces": False,
        **specials,
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    for path, obj in (
        (folder / "tokenizer_config.json", config),
        (folder / "special_tokens_map.json", specials),
    ):
        path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
