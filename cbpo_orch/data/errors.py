"""The error of bad user data, shared by the source readers and the row logic."""

from __future__ import annotations

from typing import Any


class DataError(ValueError):
    """Bad user data or task definition; the message is one line naming the file and the record."""


def kind(value: Any) -> str:
    """A JSON name for a value's type, for error messages."""
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(type(value), "number")
