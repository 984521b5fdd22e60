"""Read JSONL training data and validate every row, so bad input fails naming its file, line and field."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge_mlx.errors import ForgeError, located

SFT_FORMATS = ("chat", "completions", "text")
KINDS = {"sft": SFT_FORMATS, "preference": ("preference",)}
ROLES = ("system", "user", "assistant", "tool")
SPLITS = ("train", "valid", "test")
_FORMAT_HELP = (
    'rows must be {"messages": [...]}, {"prompt": ..., "completion": ...}, {"text": ...} '
    'or {"prompt": ..., "chosen": ..., "rejected": ...}'
)


@dataclass(frozen=True)
class Record:
    """One validated row, normalised; `source` and `line` locate it for errors raised later (templates)."""

    fmt: str  # "chat" | "completions" | "text" | "preference"
    data: dict[str, Any]
    source: str
    line: int

    def where(self, field: str | None = None) -> str:
        return located(self.source, self.line, field)


@dataclass(frozen=True)
class Dataset:
    """The validated rows of one file; `skipped` holds the errors of rows dropped by skip_bad_rows."""

    path: Path
    fmt: str
    records: list[Record]
    skipped: list[str]

    def __len__(self) -> int:
        return len(self.records)


def load_split(
    path: str | Path,
    split: str,
    *,
    kind: str | None = None,
    skip_bad_rows: bool = False,
    required: bool = True,
) -> Dataset | None:
    """Load `split` from a folder of train/valid/test.jsonl, or a .jsonl file; None if absent and optional.

    A file serves any split asked for with required=True; an optional lookup (a validation set, say) only
    finds a file named for that split, so a lone training file is never reused as its own validation set.
    """
    path = Path(path)
    if split not in SPLITS:
        raise ForgeError(f"unknown split '{split}'", hint=f"use one of {', '.join(SPLITS)}")
    file = path / f"{split}.jsonl" if path.is_dir() else path
    if not file.is_file() or (not required and file.stem != split):
        if not required:
            return None
        found = sorted(p.name for p in path.glob("*.jsonl")) if path.is_dir() else []
        raise ForgeError(
            f"no {split} data found",
            where=str(file),
            hint=f"the folder holds {found}" if found else "pass a .jsonl file or a folder with train.jsonl",
        )
    return read_jsonl(file, kind=kind, skip_bad_rows=skip_bad_rows)


def read_jsonl(path: str | Path, *, kind: str | None = None, skip_bad_rows: bool = False) -> Dataset:
    """Parse and validate every line; all rows must share one format (of `kind`: "sft" or "preference")."""
    path = Path(path)
    records: list[Record] = []
    skipped: list[str] = []
    fmt = None
    for line_no, obj in _json_lines(path):
        try:
            record = validate_row(obj, source=str(path), line=line_no, fmt=fmt)
        except ForgeError as err:
            if not skip_bad_rows:
                raise
            skipped.append(str(err))
            continue
        if fmt is None:
            fmt = record.fmt
            _check_kind(fmt, kind, record)
        records.append(record)
    if not records:
        note = f"all {len(skipped)} rows were skipped as bad" if skipped else "the file holds no rows"
        raise ForgeError(f"empty dataset: {note}", where=str(path), hint=_FORMAT_HELP)
    return Dataset(path=path, fmt=fmt, records=records, skipped=skipped)


def _json_lines(path: Path):
    """Yield (line number, parsed object) for each non-blank line, locating encoding and JSON errors."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise ForgeError(f"cannot read data file: {err.strerror}", where=str(path)) from err
    offset = 3 if raw.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte-order mark
    for line_no, chunk in enumerate(raw[offset:].split(b"\n"), start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as err:
            at = offset + err.start
            raise ForgeError(
                f"not valid UTF-8 at byte offset {at} (byte 0x{chunk[err.start]:02x})",
                where=located(path, line_no),
                hint="re-save the file as UTF-8",
            ) from err
        offset += len(chunk) + 1
        if text.strip():
            try:
                yield line_no, json.loads(text)
            except json.JSONDecodeError as err:
                raise ForgeError(
                    f"malformed JSON at column {err.colno}: {err.msg}",
                    where=located(path, line_no),
                    hint="each line must be one complete JSON object",
                ) from err


def _check_kind(fmt: str, kind: str | None, record: Record) -> None:
    if kind is not None and fmt not in KINDS[kind]:
        raise ForgeError(
            f"{kind} training needs {'/'.join(KINDS[kind])} rows but this file holds {fmt} rows",
            where=record.where(),
        )


def detect_format(obj: dict[str, Any]) -> str | None:
    """The format a row's keys announce; partial rows still match so the missing field gets named."""
    if "chosen" in obj or "rejected" in obj:
        return "preference"
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "completions"
    if "text" in obj:
        return "text"
    return None


def validate_row(obj: Any, *, source: str, line: int, fmt: str | None = None) -> Record:
    """Check one parsed row (in format `fmt`, when the file's earlier rows fixed it) and normalise it."""
    where = lambda field=None: located(source, line, field)
    if not isinstance(obj, dict):
        raise ForgeError(f"expected a JSON object, got {_kind(obj)}", where=where(), hint=_FORMAT_HELP)
    found = detect_format(obj)
    if found is None:
        raise ForgeError(f"unrecognised row with keys {sorted(obj)}", where=where(), hint=_FORMAT_HELP)
    if fmt is not None and found != fmt:
        raise ForgeError(f"row is {found} format but earlier rows are {fmt}", where=where(), hint=_FORMAT_HELP)
    check = {"chat": _chat, "completions": _completions, "text": _text, "preference": _preference}[found]
    return Record(fmt=found, data=check(obj, where), source=source, line=line)


def _chat(obj: dict, where) -> dict:
    messages = _messages(obj, "messages", where)
    turns = [(f"messages[{i}]", m) for i, m in enumerate(messages)]
    if "system" in obj:
        if messages[0]["role"] == "system":
            raise ForgeError("both a 'system' field and a system message", where=where("system"))
        turns.insert(0, ("system", {"role": "system", "content": _string(obj, "system", where)}))
    _check_order(turns, where)
    messages = [m for _, m in turns]
    if not any(m["role"] == "assistant" for m in messages):
        raise ForgeError("conversation has no assistant message, so nothing to train on", where=where("messages"))
    return {"messages": messages, "tools": _tools(obj, where)}


def _completions(obj: dict, where) -> dict:
    return {"prompt": _string(obj, "prompt", where), "completion": _string(obj, "completion", where)}


def _text(obj: dict, where) -> dict:
    return {"text": _string(obj, "text", where)}


def _preference(obj: dict, where) -> dict:
    if "prompt" not in obj:
        raise ForgeError("missing field", where=where("prompt"))
    if isinstance(obj["prompt"], str):
        data = {name: _string(obj, name, where) for name in ("prompt", "chosen", "rejected")}
    else:
        prompt = _messages(obj, "prompt", where)
        if prompt[-1]["role"] == "assistant":
            raise ForgeError("prompt must end with a user or tool message", where=where("prompt"))
        data = {
            "prompt": prompt,
            "chosen": _reply(obj, "chosen", where),
            "rejected": _reply(obj, "rejected", where),
        }
        data["tools"] = _tools(obj, where)
        for name in ("chosen", "rejected"):
            turns = [(f"prompt[{i}]", m) for i, m in enumerate(prompt)]
            _check_order(turns + [(f"{name}[{i}]", m) for i, m in enumerate(data[name])], where)
    if data["chosen"] == data["rejected"]:
        raise ForgeError("'chosen' and 'rejected' are identical", where=where("rejected"))
    return data


def _reply(obj: dict, name: str, where) -> list[dict]:
    """A chosen/rejected reply in chat form: one assistant message or a list starting with one."""
    if name not in obj:
        raise ForgeError("missing field", where=where(name))
    value = obj[name]
    if isinstance(value, str):
        raise ForgeError("is a string but 'prompt' is a message list", where=where(name), hint="use one form")
    messages = _messages({name: [value] if isinstance(value, dict) else value}, name, where)
    if messages[0]["role"] != "assistant":
        raise ForgeError("must start with an assistant message", where=where(f"{name}[0].role"))
    return messages


def _messages(obj: dict, name: str, where) -> list[dict]:
    """A non-empty list of {"role", "content"} messages, each checked for shape (order is checked later)."""
    if name not in obj:
        raise ForgeError("missing field", where=where(name))
    value = obj[name]
    if not isinstance(value, list) or not value:
        raise ForgeError(f"must be a non-empty list of messages, got {_kind(value)}", where=where(name))
    return [_message(m, f"{name}[{i}]", where) for i, m in enumerate(value)]


def _message(msg: Any, field: str, where) -> dict:
    if not isinstance(msg, dict):
        raise ForgeError(f"a message must be an object, got {_kind(msg)}", where=where(field))
    if "role" not in msg:
        raise ForgeError("missing field", where=where(f"{field}.role"))
    role = msg["role"]
    if role not in ROLES:
        raise ForgeError(f"unknown role {role!r}", where=where(f"{field}.role"), hint=f"use one of {', '.join(ROLES)}")
    if role == "assistant" and msg.get("tool_calls"):
        if not isinstance(msg["tool_calls"], list):
            raise ForgeError(f"must be a list, got {_kind(msg['tool_calls'])}", where=where(f"{field}.tool_calls"))
        if msg.get("content") in (None, ""):
            return {**msg, "content": ""}
    _string(msg, "content", lambda f: where(f"{field}.{f}"))
    return dict(msg)


def _check_order(turns: list[tuple[str, dict]], where) -> None:
    """Orders every common chat template accepts: system first only, then a user turn, tools after a call."""
    previous = None
    for i, (field, msg) in enumerate(turns):
        role = msg["role"]
        if role == "system" and i != 0:
            raise ForgeError("a system message may only come first", where=where(f"{field}.role"))
        if previous in (None, "system") and role not in ("user", "system"):
            raise ForgeError(
                f"the conversation must open with a user message, not {role!r}", where=where(f"{field}.role")
            )
        if role == "tool" and previous not in ("assistant", "tool"):
            raise ForgeError("a tool message must follow an assistant message", where=where(f"{field}.role"))
        previous = role


def _tools(obj: dict, where) -> list | None:
    tools = obj.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ForgeError("must be a list of tool objects (JSON schemas)", where=where("tools"))
    return tools


def _string(obj: dict, name: str, where) -> str:
    if name not in obj:
        raise ForgeError("missing field", where=where(name))
    value = obj[name]
    if not isinstance(value, str):
        raise ForgeError(f"must be a string, got {_kind(value)}", where=where(name))
    if not value.strip():
        raise ForgeError("empty content", where=where(name))
    return value


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )
