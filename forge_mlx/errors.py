"""The one error class users see: its message names the file, line, key or layer and what to do."""

from __future__ import annotations


class ForgeError(Exception):
    """A user-facing error; the CLI prints it as one line (no traceback unless --debug)."""

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None):
        self.where = where
        self.hint = hint
        text = f"{where}: {message}" if where else message
        if hint:
            text = f"{text} ({hint})"
        super().__init__(text)


def located(path: object, line: int | None = None, field: str | None = None) -> str:
    """Format 'file:line: field' for error messages."""
    where = str(path)
    if line is not None:
        where += f":{line}"
    if field:
        where += f": field '{field}'"
    return where
