"""SFT and preference encoding on a tiny real tokenizer (ChatML), with spans counted by hand."""

from pathlib import Path

import helpers
import pytest

from forge_mlx.data import Dataset, encode_preference, encode_preference_split, encode_sft, encode_sft_split
from forge_mlx.data.jsonl import validate_row
from forge_mlx.errors import ForgeError

WORDS = "user assistant system tool you are kind hello there how fine thanks bye good bad why".split()
SMOL = Path("/work/main/models/SmolLM2-135M-Instruct")


def tiny_tokenizer(chat_template: str | None = helpers.CHATML):
    return helpers.tiny_tokenizer(WORDS, chat_template)


def spell(tokenizer, example):
    """Tokens as text, supervised ones starred, newlines as '/'."""
    tokens, mask = example
    names = tokenizer.convert_ids_to_tokens(tokens)
    return " ".join(("*" if m else "") + n.replace("\n", "/") for n, m in zip(names, mask, strict=True))


def row(obj, line=7):
    return validate_row(obj, source="data.jsonl", line=line)


def m(role, content):
    return {"role": role, "content": content}


THREE_TURNS = row(
    {
        "system": "you are kind",
        "messages": [
            m("user", "hello there"),
            m("assistant", "hello"),
            m("user", "how are you"),
            m("assistant", "fine thanks"),
            m("user", "bye"),
            m("assistant", "bye bye"),
        ],
    }
)


def test_every_assistant_turn_and_its_im_end_is_supervised():
    tok = tiny_tokenizer()
    got = spell(tok, encode_sft(THREE_TURNS, tok))
    assert got == (
        "<|im_start|> system / you are kind <|im_end|> / "
        "<|im_start|> user / hello there <|im_end|> / <|im_start|> assistant / *hello *<|im_end|> / "
        "<|im_start|> user / how are you <|im_end|> / <|im_start|> assistant / *fine *thanks *<|im_end|> / "
        "<|im_start|> user / bye <|im_end|> / <|im_start|> assistant / *bye *bye *<|im_end|> /"
    )
    tokens, mask = encode_sft(THREE_TURNS, tok)
    # by hand, turn by turn (start position: length): system 0:8, user 8:7, asst 15:6, user 21:8, asst 29:7,
    # user 36:6, asst 42:7 = 49 tokens; a reply starts 3 tokens into its turn and runs through <|im_end|>
    assert len(tokens) == 49 and [i for i, x in enumerate(mask) if x] == [18, 19, 32, 33, 34, 45, 46, 47]


def test_last_assistant_and_unmasked_prompt():
    tok = tiny_tokenizer()
    tokens, mask = encode_sft(THREE_TURNS, tok, supervise="last_assistant")
    assert [i for i, x in enumerate(mask) if x] == [45, 46, 47]
    tokens, mask = encode_sft(THREE_TURNS, tok, mask_prompt=False)
    assert mask == [False] + [True] * 48  # token 0 is never a target


def test_completions_through_the_template_and_raw():
    tok = tiny_tokenizer()
    ex = row({"prompt": "how are you", "completion": "fine thanks"})
    assert spell(tok, encode_sft(ex, tok)) == (
        "<|im_start|> user / how are you <|im_end|> / <|im_start|> assistant / *fine *thanks *<|im_end|> /"
    )
    # raw: prompt tokens masked, completion + EOS supervised (this tokenizer adds no BOS)
    assert spell(tok, encode_sft(ex, tok, use_chat_template=False)) == "how are you *fine *thanks *<|im_end|>"
    assert spell(tok, encode_sft(ex, tiny_tokenizer(None))) == "how are you *fine *thanks *<|im_end|>"


def test_text_is_all_supervised_with_eos():
    tok = tiny_tokenizer()
    assert spell(tok, encode_sft(row({"text": "hello there"}), tok)) == "hello *there *<|im_end|>"


def test_chat_without_template_is_a_located_error():
    with pytest.raises(ForgeError, match=r"data\.jsonl:7: field 'messages': the tokenizer has no chat template"):
        encode_sft(THREE_TURNS, tiny_tokenizer(None))


def test_template_exceptions_and_unstable_templates_are_located_errors():
    strict = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(ForgeError, match=r"data\.jsonl:7: field 'messages': .*roles must alternate"):
        encode_sft(THREE_TURNS, tiny_tokenizer(strict))
    # renders the final message differently, like templates that drop reasoning from earlier turns
    shifty = helpers.CHATML.replace("m['content']", "m['content'] + (' why' if loop.last else '')")
    with pytest.raises(ForgeError, match=r"data\.jsonl:7: field 'messages': .*supervise: last_assistant"):
        encode_sft(THREE_TURNS, tiny_tokenizer(shifty))


def test_mlx_lm_tokenizer_wrapper_gives_the_same_encoding():
    tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils")
    tok = tiny_tokenizer()
    assert encode_sft(THREE_TURNS, tokenizer_utils.TokenizerWrapper(tok)) == encode_sft(THREE_TURNS, tok)


def dataset(rows):
    records = [row(r, line=i + 1) for i, r in enumerate(rows)]
    return Dataset(path=Path("data.jsonl"), fmt=records[0].fmt, records=records, skipped=["x"])


def test_overlong_examples_are_truncated_or_dropped_and_counted():
    tok = tiny_tokenizer()
    # raw lengths: 3 + 1 eos = 4, 6, 9 tokens; prompt of the third is 5 tokens
    rows = [
        {"prompt": "how are", "completion": "fine"},
        {"prompt": "how are", "completion": "fine thanks bye"},
        {"prompt": "how are you kind hello", "completion": "bye bye bye"},
    ]
    out = encode_sft_split(dataset(rows), tok, max_seq_length=5, use_chat_template=False)
    # second cut to 5 (keeps 2 targets); third cut to 5 keeps only prompt -> no target
    assert (out.truncated, out.dropped_overlong, out.dropped_no_target, out.skipped_rows) == (1, 0, 1, 1)
    assert [len(t) for t, _ in out.examples] == [4, 5]
    out = encode_sft_split(dataset(rows), tok, max_seq_length=5, overlong="drop", use_chat_template=False)
    assert (out.truncated, out.dropped_overlong, out.dropped_no_target) == (0, 2, 0)
    with pytest.raises(ForgeError, match="overlong='cut' is not one of truncate, drop"):
        encode_sft_split(dataset(rows), tok, max_seq_length=5, overlong="cut")


def test_preference_pairs_share_the_prompt_and_mask_the_completion_only():
    tok = tiny_tokenizer()
    pair = encode_preference(row({"prompt": "why", "chosen": "good thanks", "rejected": "bad"}), tok)
    prompt = "<|im_start|> user / why <|im_end|> / <|im_start|> assistant /"
    assert spell(tok, pair.chosen) == prompt + " *good *thanks *<|im_end|> /"
    assert spell(tok, pair.rejected) == prompt + " *bad *<|im_end|> /"
    raw = encode_preference(row({"prompt": "why", "chosen": "good", "rejected": "bad"}), tok, use_chat_template=False)
    assert (spell(tok, raw.chosen), spell(tok, raw.rejected)) == (
        "why *good *<|im_end|>",
        "why *bad *<|im_end|>",
    )
    chat = {
        "prompt": [m("system", "you are kind"), m("user", "why")],
        "chosen": [m("assistant", "good")],
        "rejected": m("assistant", "bad bad"),
    }
    pair = encode_preference(row(chat), tok)
    system = "<|im_start|> system / you are kind <|im_end|> / "
    assert spell(tok, pair.rejected) == system + prompt + " *bad *bad *<|im_end|> /"
    with pytest.raises(ForgeError, match=r"data\.jsonl:7: field 'prompt': the tokenizer has no chat template"):
        encode_preference(row(chat), tiny_tokenizer(None))


def test_preference_length_policy_counts_pairs():
    tok = tiny_tokenizer()
    rows = [
        {"prompt": "why", "chosen": "good", "rejected": "bad"},  # 3 tokens each side
        {"prompt": "why", "chosen": "good thanks bye", "rejected": "bad"},  # chosen 5
        {"prompt": "how are you kind", "chosen": "good", "rejected": "bad"},  # prompt fills 4
    ]
    out = encode_preference_split(dataset(rows), tok, max_seq_length=4, use_chat_template=False)
    assert (out.truncated, out.dropped_overlong, out.dropped_no_target) == (1, 0, 1)
    assert [(len(p.chosen[0]), len(p.rejected[0])) for p in out.examples] == [(3, 3), (4, 3)]
    out = encode_preference_split(dataset(rows), tok, max_seq_length=4, overlong="drop", use_chat_template=False)
    assert (out.truncated, out.dropped_overlong, out.dropped_no_target) == (0, 2, 0)


@pytest.mark.slow
@pytest.mark.skipif(not SMOL.is_dir(), reason="SmolLM2-135M-Instruct not downloaded")
def test_smollm2_assistant_spans_decode_to_the_replies():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(SMOL)
    tokens, mask = encode_sft(THREE_TURNS, tok)
    spans, current = [], []
    for t, keep in zip(tokens, mask, strict=True):
        if keep:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    replies = ["hello", "fine thanks", "bye bye"]
    assert [tok.decode(s) for s in spans] == [r + "<|im_end|>" for r in replies]
