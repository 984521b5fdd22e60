"""Reading and validating JSONL data: formats, splits, and a located ForgeError for every bad input."""

import json

import pytest

from forge_mlx.data import load_split, read_jsonl
from forge_mlx.errors import ForgeError

U, A = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


def write(path, rows):
    """Rows may be dicts (dumped as JSON) or raw str/bytes lines."""
    lines = [r if isinstance(r, (str, bytes)) else json.dumps(r) for r in rows]
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def test_formats_are_detected_and_normalised(tmp_path):
    chat = {"system": "be brief", "messages": [msg(U, "hi"), msg(A, "hello")]}
    ds = read_jsonl(write(tmp_path / "c.jsonl", [chat, chat]))
    assert ds.fmt == "chat" and len(ds) == 2 and ds.skipped == []
    assert ds.records[0].data["messages"][0] == msg("system", "be brief")  # system field becomes message 0
    assert [r.line for r in ds.records] == [1, 2]
    assert read_jsonl(write(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}])).fmt == "completions"
    assert read_jsonl(write(tmp_path / "t.jsonl", [{"text": "a"}])).fmt == "text"
    pref = {"prompt": [msg(U, "q")], "chosen": msg(A, "good"), "rejected": [msg(A, "bad")]}
    rec = read_jsonl(write(tmp_path / "d.jsonl", [pref]), kind="preference").records[0]
    assert rec.fmt == "preference" and rec.data["chosen"] == [msg(A, "good")]  # one message becomes a list


def test_blank_lines_and_bom_are_tolerated_and_lines_keep_their_numbers(tmp_path):
    path = write(tmp_path / "t.jsonl", [b'\xef\xbb\xbf{"text": "a"}', "", "   ", {"text": "b"}])
    assert [r.line for r in read_jsonl(path).records] == [1, 4]


def test_load_split_from_folder_or_file(tmp_path):
    write(tmp_path / "train.jsonl", [{"text": "a"}])
    assert load_split(tmp_path, "train").records[0].data == {"text": "a"}
    assert load_split(tmp_path / "train.jsonl", "test").fmt == "text"  # a file asked for explicitly is used
    assert load_split(tmp_path, "valid", required=False) is None
    assert load_split(tmp_path / "train.jsonl", "valid", required=False) is None  # never its own valid set
    with pytest.raises(ForgeError, match=r"valid\.jsonl.*no valid data.*train\.jsonl"):
        load_split(tmp_path, "valid")
    with pytest.raises(ForgeError, match="unknown split"):
        load_split(tmp_path, "dev")


CHAT_OK = {"messages": [msg(U, "hi"), msg(A, "hello")]}
BAD = [  # (rows, line, what the message must also say)
    ([CHAT_OK, '{"messages": [}'], 2, "malformed JSON at column 15"),
    ([CHAT_OK, [1, 2]], 2, "expected a JSON object"),
    ([{"foo": 1}], 1, "unrecognised row"),
    ([{"prompt": "a"}], 1, "field 'completion': missing field"),
    ([{"text": 3}], 1, "field 'text': must be a string, got a number"),
    ([{"text": "  "}], 1, "field 'text': empty content"),
    ([CHAT_OK, {"text": "a"}], 2, "row is text format but earlier rows are chat"),
    ([{"messages": "hi"}], 1, "field 'messages': must be a non-empty list"),
    ([{"messages": [msg(U, "hi"), {"content": "x"}]}], 1, "field 'messages[1].role': missing field"),
    ([{"messages": [msg(U, "hi"), msg("bot", "x")]}], 1, "field 'messages[1].role': unknown role 'bot'"),
    ([{"messages": [msg(U, "hi"), msg(A, "")]}], 1, "field 'messages[1].content': empty content"),
    ([{"messages": [msg(U, "hi"), msg(A, ["x"])]}], 1, "field 'messages[1].content': must be a string"),
    ([{"messages": [msg(A, "x"), msg(U, "hi")]}], 1, "field 'messages[0].role': the conversation must open"),
    ([{"messages": [msg(U, "a"), msg("system", "s"), msg(A, "b")]}], 1, "field 'messages[1].role': a system"),
    ([{"messages": [msg(U, "a"), msg("tool", "t"), msg(A, "b")]}], 1, "field 'messages[1].role': a tool"),
    ([{"messages": [msg(U, "a"), msg(U, "b")]}], 1, "field 'messages': conversation has no assistant"),
    ([{"system": "s", "messages": [msg("system", "t"), msg(U, "a"), msg(A, "b")]}], 1, "field 'system'"),
    ([{"messages": [msg(U, "a"), msg(A, "b")], "tools": {"x": 1}}], 1, "field 'tools'"),
    ([{"prompt": "p", "chosen": "same", "rejected": "same"}], 1, "field 'rejected': 'chosen' and 'rejected'"),
    ([{"prompt": "p", "chosen": "c"}], 1, "field 'rejected': missing field"),
    ([{"chosen": "c", "rejected": "r"}], 1, "field 'prompt': missing field"),
    ([{"prompt": [msg(U, "q")], "chosen": "c", "rejected": msg(A, "r")}], 1, "field 'chosen': is a string"),
    (
        [{"prompt": [msg(U, "q")], "chosen": msg(U, "c"), "rejected": msg(A, "r")}],
        1,
        "field 'chosen[0].role'",
    ),
    ([{"prompt": [msg(U, "q"), msg(A, "a")], "chosen": msg(A, "c"), "rejected": msg(A, "r")}], 1, "prompt"),
]


@pytest.mark.parametrize("rows, line, detail", BAD, ids=[b[2][:40] for b in BAD])
def test_every_bad_input_names_file_line_and_field(tmp_path, rows, line, detail):
    path = write(tmp_path / "data.jsonl", rows)
    with pytest.raises(ForgeError) as info:
        read_jsonl(path)
    assert f"{path}:{line}" in str(info.value) and detail in str(info.value)


def test_non_utf8_names_the_byte_offset(tmp_path):
    path = write(tmp_path / "data.jsonl", [b'{"text": "ok"}', b'{"text": "\xff"}'])
    # line 1 is 14 bytes + newline; the bad byte follows the 10 bytes '{"text": "' of line 2: 15 + 10 = 25
    with pytest.raises(ForgeError, match=r"data\.jsonl:2: not valid UTF-8 at byte offset 25 \(byte 0xff\)"):
        read_jsonl(path)


def test_empty_dataset_and_wrong_kind(tmp_path):
    with pytest.raises(ForgeError, match=r"empty\.jsonl: empty dataset: the file holds no rows"):
        read_jsonl(write(tmp_path / "empty.jsonl", [""]))
    pref = write(tmp_path / "pref.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    with pytest.raises(ForgeError, match=r"pref\.jsonl:1: sft training needs chat/completions/text rows"):
        read_jsonl(pref, kind="sft")


def test_skip_bad_rows_skips_and_counts(tmp_path):
    good = {"prompt": "p", "chosen": "c", "rejected": "r"}
    rows = [{"prompt": "p", "chosen": "x", "rejected": "x"}, good, {"prompt": "p", "chosen": "c"}]
    ds = read_jsonl(write(tmp_path / "pref.jsonl", rows), skip_bad_rows=True)
    assert [r.line for r in ds.records] == [2] and len(ds.skipped) == 2
    assert "pref.jsonl:1: field 'rejected'" in ds.skipped[0] and "pref.jsonl:3: field 'rejected'" in ds.skipped[1]
    with pytest.raises(ForgeError, match="all 1 rows were skipped"):
        read_jsonl(write(tmp_path / "bad.jsonl", rows[:1]), skip_bad_rows=True)
    with pytest.raises(ForgeError, match="malformed JSON"):  # a broken file is never skipped over
        read_jsonl(write(tmp_path / "broken.jsonl", [good, "{"]), skip_bad_rows=True)


def test_tool_calls_and_tool_messages_are_accepted(tmp_path):
    call = {"role": A, "content": None, "tool_calls": [{"type": "function", "function": {"name": "f"}}]}
    row = {
        "messages": [msg(U, "q"), call, msg("tool", "42"), msg(A, "it is 42")],
        "tools": [{"type": "function"}],
    }
    rec = read_jsonl(write(tmp_path / "tools.jsonl", [row])).records[0]
    assert rec.data["messages"][1]["content"] == "" and rec.data["tools"] == [{"type": "function"}]
