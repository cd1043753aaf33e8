"""File names as stored, printed and exchanged: any name a filesystem allows, exactly, in every form.

In memory a path is the `str` Python's `os` functions give (os.fsdecode: bytes that are not UTF-8 become lone
surrogates U+DC80..U+DCFF, "surrogateescape"), so `open(path)` works and `os.fsencode(path)` gives the bytes on
disk back. Three other forms, each reversible or clearly marked:

- **stored** (LanceDB strings must be valid UTF-8): the display form below in the `path` column, plus the exact
  bytes, base64, under `path_bytes` in the row's `meta` JSON. Only names that are not valid UTF-8 carry it.
- **JSON** (`search --json`, the server): `path` is the surrogateescape `str` written with `\\udcXX` escapes, so
  `os.fsencode(json.loads(text)["path"])` is the name on disk in Python; for any other reader, a name that is
  not valid UTF-8 also carries `path_bytes`, the exact bytes in base64 (json_fields).
- **display** (tables, HTML): undecodable bytes as `\\xNN`, control characters (tab, newline, ...) as `\\t`,
  `\\n`, `\\xNN`, everything else (markup brackets included) literally. One line per name, never ambiguous
  with another name on the same screen except for a name that literally holds such a backslash sequence.
"""

from __future__ import annotations

import base64
import json
from typing import Any

PATH_BYTES = "path_bytes"  # meta / JSON key: base64 of the exact name, present only for non-UTF-8 names
_CONTROL = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def is_utf8(path: str) -> bool:
    """False when the name holds bytes that are not UTF-8 (surrogates from os.fsdecode)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def name_bytes(path: str) -> bytes:
    """The exact bytes of a name, whatever the platform's filesystem encoding."""
    return path.encode("utf-8", "surrogateescape")


def display(path: str) -> str:
    """One printable line: undecodable bytes as \\xNN, control characters escaped, the rest literal."""
    text = name_bytes(path).decode("utf-8", "backslashreplace") if not is_utf8(path) else path
    if text.isprintable():
        return text
    return "".join(
        _CONTROL.get(c, f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        if not c.isprintable() and c != " "
        else c
        for c in text
    )


def to_stored(path: str, meta: str | None) -> tuple[str, str | None]:
    """(path column, meta column) for a row: valid UTF-8 always, the exact bytes kept in meta when needed."""
    if is_utf8(path):
        return path, meta
    extra = json.loads(meta) if meta else {}
    extra[PATH_BYTES] = base64.b64encode(name_bytes(path)).decode("ascii")
    return display(path), json.dumps(extra)


def from_stored(path: str, meta: str | None) -> str:
    """The in-memory path of a stored row (inverse of to_stored)."""
    if not meta or PATH_BYTES not in meta:  # cheap test first: almost every row has plain "{}"
        return path
    raw = json.loads(meta).get(PATH_BYTES)
    return base64.b64decode(raw).decode("utf-8", "surrogateescape") if raw else path


def json_fields(path: str) -> dict[str, Any]:
    """The JSON form of a name: {"path": ...} plus {"path_bytes": base64} when it is not valid UTF-8."""
    if is_utf8(path):
        return {"path": path}
    return {"path": path, PATH_BYTES: base64.b64encode(name_bytes(path)).decode("ascii")}


def json_dumps(data: Any) -> str:
    """JSON text that any name survives: ensure_ascii writes lone surrogates as \\udcXX escapes, where
    ensure_ascii=False would fail to encode them."""
    return json.dumps(data, ensure_ascii=True)
