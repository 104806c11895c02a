"""Checking JSON configs by a schema before anything uses them.

A schema maps a key to a validator; each returns the value or raises `SchemaError` with
what was expected, and `validate` turns that into one line naming the file and the key.
Keys a schema does not list are kept as they are (configs carry many fields pera-deploy
does not use); keys it lists are checked when present. Types are strict: "8" is not an
integer, "false" is not a boolean, and `true` is not the integer 1.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError

Validator = Callable[[Any], Any]


class SchemaError(ValueError):
    """What a value should have been."""


def validate(config: dict[str, Any], schema: dict[str, Validator], where: Path | str) -> dict[str, Any]:
    for key, check in schema.items():
        if key in config:
            try:
                check(config[key])
            except SchemaError as exc:
                raise InputError(f"{where}: {key} {exc}; found {shown(config[key])}") from None
    return config


def shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise SchemaError("must be true or false")
    return value


def string(value: Any) -> str:
    if not isinstance(value, str):
        raise SchemaError("must be a string")
    return value


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SchemaError("must be a positive integer")
    return value


def positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SchemaError("must be a positive number")
    return value


def string_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise SchemaError("must be a list of strings")
    return value


def one_of(*allowed: str) -> Validator:
    def check(value: Any) -> str:
        if value not in allowed:
            raise SchemaError(f"must be one of {', '.join(allowed)}")
        return value

    return check


def optional(inner: Validator) -> Validator:
    """`inner`, or null."""

    def check(value: Any) -> Any:
        return None if value is None else inner(value)

    return check


def either(*checks: Validator) -> Validator:
    def check(value: Any) -> Any:
        errors = []
        for inner in checks:
            try:
                return inner(value)
            except SchemaError as exc:
                errors.append(str(exc).removeprefix("must be "))
        raise SchemaError("must be " + " or ".join(errors))

    return check


def regex(value: Any) -> str:
    """A string that compiles as a Python regular expression (what PEFT matches it with)."""
    string(value)
    try:
        re.compile(value)
    except re.error as exc:
        raise SchemaError(f"is not a valid regular expression ({exc})") from None
    return value


def mapping(key: Validator, value: Validator) -> Validator:
    """A JSON object whose every key passes `key` and every value passes `value`."""

    def check(obj: Any) -> dict[str, Any]:
        if not isinstance(obj, dict):
            raise SchemaError("must be a JSON object")
        for k, v in obj.items():
            try:
                key(k)
                value(v)
            except SchemaError as exc:
                raise SchemaError(f"entry {k!r} {exc}") from None
        return obj

    return check
