"""Strict JSON for every config, index and header pera-deploy reads.

Duplicate keys, NaN/Infinity, absurdly long integers and deep nesting are refused with one
line naming the file: the standard parser keeps the last of two duplicate keys silently (so
a file could read one way here and another way elsewhere), and recurses on nesting.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from .paths import require_readable_file

# Bounds on what any config, index or header may hold: deeper nesting or longer integers have
# no meaning in them, and only cost time and memory (a 100,000-deep array, a 100,000-digit int).
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 20


def parse_json(text: str | bytes, where: Path | str) -> Any:
    """Strict JSON: duplicate keys, NaN/Infinity, integers over MAX_INT_DIGITS digits and
    nesting deeper than MAX_JSON_DEPTH are refused with one line naming `where`.

    The standard parser keeps the last of duplicate keys silently, so two files could read
    one way here and another way in a tool that keeps the first.
    """

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise InputError(f"{where}: duplicate key {key!r}")
            obj[key] = value
        return obj

    def integer(digits: str) -> int:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            raise InputError(f"{where}: an integer of {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
        return int(digits)

    def number(digits: str) -> float:
        value = float(digits)
        if value in (float("inf"), float("-inf")):
            raise InputError(f"{where}: number {digits[:20]} is out of range")
        return value

    def constant(name: str) -> float:
        raise InputError(f"{where}: {name} is not a JSON number")

    _check_depth(text, where)
    try:
        return json.loads(text, object_pairs_hook=unique, parse_int=integer, parse_float=number,
                          parse_constant=constant)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    except (RecursionError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"{where}: not valid JSON ({type(exc).__name__})") from None


def _check_depth(text: str | bytes, where: Path | str) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH before parsing (the parser would recurse)."""
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return  # cannot be deeper, whatever the brackets are
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > MAX_JSON_DEPTH:
                raise InputError(f"{where}: JSON nested more than {MAX_JSON_DEPTH} levels deep")
        elif byte in (0x5D, 0x7D):
            depth -= 1


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path` (strict: see `parse_json`), or an InputError naming the file."""
    if path.is_dir():
        raise InputError(f"{path}: is a folder, expected a JSON file")
    require_readable_file(path)  # missing, unreadable, or a FIFO that would block: said as it is
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        kind = "a dangling link" if path.is_symlink() else "file not found"
        raise InputError(f"{path}: {kind}") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    value = parse_json(text, path)
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value
