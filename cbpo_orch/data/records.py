"""The records a data set is made of: a user's history items, its queries, and the (x, y)
pairs built from history items. Plain values, imported by the loader (``dataset.py``) and by
the task definitions (``tasks.py``) that turn them into prompts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class ProfileItem:
    """One history item of a user: its text fields (all strings) and optional date."""

    id: str
    fields: Mapping[str, str]
    date: str | None


@dataclass(frozen=True)
class Query:
    """One query of a user: the input text and the gold output (None where the split has none)."""

    id: str
    input: str
    gold: str | None


@dataclass(frozen=True)
class Example:
    """One (x, y) pair made from a profile item, e.g. for training or the auxiliary index."""

    x: str
    y: str
    item_id: str
    user_id: str
