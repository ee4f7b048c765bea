"""Per-user task data: load one split of a data set into users, profiles and queries.

A data set is whatever :func:`cbpo_orch.data.sources.open_source` opens (a folder of split
files, parquet shards, a ``save_to_disk`` folder, a hub id); every form gives its splits in
one of two shapes, turned into users here by one path:

- LaMP: ``{split}_questions.json`` (a list of ``{"id", "user_id"?, "input", "profile"}``)
  and ``{split}_outputs.json`` (``{"task", "golds": [{"id", "output"}]}``; only a ``test``
  split may come without it, or with golds for some of its questions only). Without ``user_id`` every question is its own user (user id =
  question id); questions with the same ``user_id`` must carry the same profile.
- LongLaMP rows: ``{split}.json`` (a list), ``{split}.jsonl`` (one object a line) or any
  Arrow form of ``{"input", "output"?, "profile", "id"?}`` plus a user id under one of ``USER_ID_KEYS``.
  Rows of one user must carry the same profile. Only rows of a ``test`` split may lack ``output``.

A query without a gold (``test`` splits: LaMP's, or a product's real users) is answered and
not scored; a job may mix users with and without golds.

Against leaks (METHOD.md §5: never test queries of anyone), loading leaves out every profile
item whose prompt equals the prompt of a query of ANY split in the folder, compared after
whitespace normalisation. ``dev``, ``val`` and ``validation`` name one split. Every user of the result, and so positives, the auxiliary index and
the task adapter's data alike, sees only the items kept; texts shared by several users'
profiles stay, each owner keeping its copy.

Everything is validated on load; bad input raises ``DataError`` with a one-line message
naming the file and the record (``record N`` is the 0-based index in a JSON list,
``line N`` the 1-based line of a JSONL file, ``row N`` the 0-based row of a parquet file or a
``datasets`` split; ``profile item N`` is 0-based).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from cbpo_orch.data.errors import DataError, kind
from cbpo_orch.data.records import Example, ProfileItem, Query
from cbpo_orch.data.sources import LampFiles, Rows, json_records, open_source, read_json

if TYPE_CHECKING:
    from cbpo_orch.data.tasks import Task

USER_ID_KEYS = ("user_id", "name", "reviewerId", "author")
GOLDLESS_SPLIT = "test"
"""The one split whose queries may come without gold outputs (LaMP's test split has none)."""
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_SAFE_ID_RULE = "letters, digits, '.', '_', '-' only, not starting with '.' or '-', at most 128 characters"
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class User:
    """A user: their profile (history, in file order) and their queries."""

    id: str
    profile: tuple[ProfileItem, ...]
    queries: tuple[Query, ...]

    def recent(self, n: int | None = None) -> tuple[ProfileItem, ...]:
        """The ``n`` most recent profile items (all if None), oldest first.

        Items are ordered by date when every item has one: numerically when all dates parse
        as numbers (e.g. unix seconds), else as strings (ISO dates). Otherwise, and among
        equal dates, file order is kept, which is chronological in LaMP-style data.
        """
        if n is not None and n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        items = self.profile
        dates = [item.date for item in items]
        if all(date is not None for date in dates):
            keys = _numeric_dates(dates) or dates
            order = sorted(range(len(items)), key=keys.__getitem__)
            items = tuple(items[i] for i in order)
        return items if n is None else items[max(len(items) - n, 0):]


@dataclass(frozen=True)
class Dataset:
    """One split of a data set, read with a task; ``users`` keeps the source's order and
    their profiles hold no query's text (see the module's docstring). ``path`` is the data
    set's ``Source.ref``: an absolute path, or a hub id."""

    path: str
    split: str
    task: Task
    users: dict[str, User]

    def user(self, user_id: str) -> User:
        """The user with this id, or DataError naming the split."""
        try:
            return self.users[user_id]
        except KeyError:
            raise DataError(f"{self.path}: split {self.split!r} has no user {user_id!r}") from None

    def examples(self, user_id: str, n_recent: int | None = None) -> list[Example]:
        """The user's profile as (x, y) pairs, from their ``n_recent`` most recent items;
        DataError where every item of the profile was a query's text."""
        user = self.user(user_id)
        if not user.profile:
            raise DataError(
                f"{self.path}: user {user_id!r} of split {self.split!r} has no profile item left "
                "(each equals a query's text and was left out against leaks)"
            )
        return [self._example(item, user_id) for item in user.recent(n_recent)]

    def profile_examples(self, n_recent: int | None = None) -> list[Example]:
        """Every user's profile pairs (e.g. for the auxiliary index or the task adapter)."""
        return [self._example(item, user.id) for user in self.users.values() for item in user.recent(n_recent)]

    def _example(self, item: ProfileItem, user_id: str) -> Example:
        x, y = self.task.pair(item)
        return Example(x=x, y=y, item_id=item.id, user_id=user_id)


def find_splits(data: str | os.PathLike[str]) -> tuple[str, ...]:
    """Names of the splits a data set holds, sorted."""
    return open_source(data).splits()


def load_split(data: str | os.PathLike[str], split: str, task: Task) -> Dataset:
    """Load and validate split ``split`` of the data set ``data`` for ``task``."""
    source = open_source(data)
    held = source.split(split)
    if isinstance(held, LampFiles):
        users = _lamp_users(held.questions, held.outputs, split, task)
    else:
        users = _row_users(held, split, task)
    return Dataset(path=source.ref, split=split, task=task, users=_without_queries(users, _query_prompts(source.inputs(), task), task))


def _query_prompts(inputs: Iterable[Any], task: Task) -> frozenset[str]:
    """The normalised prompt of every query input of a data set (every split's, see
    ``Source.inputs``), whatever else its record holds."""
    return frozenset(_normalised(task.prompt(Query(id="", input=_as_text(value), gold=None))) for value in inputs if _is_scalar(value))


def _without_queries(users: dict[str, User], query_prompts: frozenset[str], task: Task) -> dict[str, User]:
    """The users with every profile item whose prompt is one of ``query_prompts`` left out."""
    return {
        user_id: replace(user, profile=tuple(item for item in user.profile if _normalised(task.pair(item)[0]) not in query_prompts))
        for user_id, user in users.items()
    }


def _normalised(text: str) -> str:
    """``text`` with whitespace runs made one space and the ends stripped: copies of one text
    that differ only in spacing or line breaks (as scraped reposts do) compare equal."""
    return " ".join(text.split())


def _lamp_users(questions: Path, outputs: Path, split: str, task: Task) -> dict[str, User]:
    """Users of a LaMP questions file, with golds from its outputs file."""
    if outputs.is_file():
        golds = _golds(outputs)
    elif split == GOLDLESS_SPLIT:
        golds = {}
    else:
        raise DataError(f"{outputs}: missing (only a {GOLDLESS_SPLIT!r} split may come without golds)")
    builder = _UserBuilder(questions)
    for label, record in json_records(questions):
        at = f"{questions}: {label}"
        _require_object(record, at)
        question_id = _safe_id(_field(record, "id", at), at)
        where = f"{questions}: {label} (id {question_id!r})"
        user_id = _safe_id(_field(record, "user_id", where), where) if "user_id" in record else question_id
        if question_id not in golds and split != GOLDLESS_SPLIT:
            raise DataError(
                f"{outputs}: no gold for question {question_id!r} ({questions.name} {label}; "
                f"only a {GOLDLESS_SPLIT!r} split may come without golds)"
            )
        query = Query(id=question_id, input=_field(record, "input", where), gold=golds.get(question_id))
        builder.add(user_id, query, _profile(record, task, where, user_id), where)
    unknown = [gold_id for gold_id in golds if not builder.has_query(gold_id)]
    if unknown:
        raise DataError(f"{outputs}: gold for unknown question {unknown[0]!r}")
    return builder.users()


def _golds(outputs: Path) -> dict[str, str]:
    """Gold outputs by question id from a LaMP outputs file."""
    data = read_json(outputs)
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise DataError(f'{outputs}: expected an object {{"task", "golds": [...]}}')
    golds: dict[str, str] = {}
    for index, gold in enumerate(data["golds"]):
        at = f"{outputs}: gold {index}"
        _require_object(gold, at)
        gold_id = _field(gold, "id", at)
        if gold_id in golds:
            raise DataError(f"{at}: duplicate id {gold_id!r}")
        golds[gold_id] = _field(gold, "output", f"{at} (id {gold_id!r})")
    return golds


def _row_users(rows: Rows, split: str, task: Task) -> dict[str, User]:
    """Users of a split held as LongLaMP-style rows, read one record at a time."""
    builder = _UserBuilder(rows.name)
    for at, record in rows.read():
        _require_object(record, at)
        user_id = _row_user_id(record, at)
        where = f"{at} (user {user_id!r})"
        if "id" in record:
            query_id = _safe_id(_field(record, "id", where), where)
        else:
            query_id = f"{user_id}-q{builder.query_count(user_id)}"
        if "output" not in record and split != GOLDLESS_SPLIT:
            raise DataError(f"{where}: lacks field 'output' (only a {GOLDLESS_SPLIT!r} split may come without golds)")
        gold = _field(record, "output", where) if "output" in record else None
        query = Query(id=query_id, input=_field(record, "input", where), gold=gold)
        builder.add(user_id, query, _profile(record, task, where, user_id), where)
    return builder.users()


def _row_user_id(record: Mapping[str, Any], where: str) -> str:
    """The row's user id; a name unsafe as a file name becomes a slug plus a short hash."""
    key = next((key for key in USER_ID_KEYS if key in record), None)
    if key is None:
        raise DataError(f"{where}: lacks a user id (one of {', '.join(map(repr, USER_ID_KEYS))})")
    raw = _field(record, key, where)
    if _SAFE_ID.fullmatch(raw):
        return raw
    slug = _UNSAFE_CHARS.sub("_", raw).lstrip(".-")[:100] or "user"
    return f"{slug}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"


class _UserBuilder:
    """Collects queries per user, checking query ids are unique and a user's profile is one."""

    def __init__(self, name: str | Path) -> None:
        self._name = name
        self._profiles: dict[str, tuple[ProfileItem, ...]] = {}
        self._queries: dict[str, list[Query]] = {}
        self._query_ids: set[str] = set()

    def query_count(self, user_id: str) -> int:
        """How many queries of this user were added so far."""
        return len(self._queries.get(user_id, ()))

    def has_query(self, query_id: str) -> bool:
        """Whether a query with this id was added."""
        return query_id in self._query_ids

    def add(self, user_id: str, query: Query, profile: tuple[ProfileItem, ...], where: str) -> None:
        """Add one record's query and profile; ``where`` names the record in errors."""
        if query.id in self._query_ids:
            raise DataError(f"{where}: duplicate question id {query.id!r}")
        self._query_ids.add(query.id)
        first_profile = self._profiles.setdefault(user_id, profile)
        if profile != first_profile:
            raise DataError(
                f"{where}: profile differs from that of the first record of user {user_id!r} "
                "(a user's records must share one profile)"
            )
        self._queries.setdefault(user_id, []).append(query)

    def users(self) -> dict[str, User]:
        """The users, in order of their first record."""
        if not self._queries:
            raise DataError(f"{self._name}: contains no records")
        return {
            user_id: User(id=user_id, profile=self._profiles[user_id], queries=tuple(queries))
            for user_id, queries in self._queries.items()
        }


def _profile(record: Mapping[str, Any], task: Task, where: str, user_id: str) -> tuple[ProfileItem, ...]:
    """The record's profile items, in file order.

    An item without ``id`` gets ``{user_id}-p{index}``. An exact repeat of an earlier item
    (same id and content, as in the real HuffPost data) is dropped; the same id with other
    content is an error.
    """
    raw = record.get("profile")
    if "profile" not in record:
        raise DataError(f"{where}: lacks field 'profile'")
    if not isinstance(raw, list):
        raise DataError(f"{where}: field 'profile' must be a list, got {kind(raw)}")
    if not raw:
        raise DataError(f"{where}: empty profile")
    required = task.item_fields()
    items: dict[str, ProfileItem] = {}
    for index, entry in enumerate(raw):
        at = f"{where}: profile item {index}"
        _require_object(entry, at)
        for name in required:
            if name not in entry:
                raise DataError(f"{at}: lacks field {name!r} (needed by task {task.name!r})")
            _field(entry, name, at)
        item = _profile_item(entry, f"{user_id}-p{index}", at)
        if item.id in items and item != items[item.id]:
            raise DataError(f"{at}: duplicate profile item id {item.id!r} with different content")
        items.setdefault(item.id, item)
    return tuple(items.values())


def _profile_item(entry: Mapping[str, Any], default_id: str, at: str) -> ProfileItem:
    """A profile item from its JSON object; fields that are not strings or numbers are dropped."""
    fields = {key: _as_text(value) for key, value in entry.items() if key not in ("id", "date") and _is_scalar(value)}
    return ProfileItem(
        id=_field(entry, "id", at) if "id" in entry else default_id,
        fields=MappingProxyType(fields),
        date=None if entry.get("date") is None else _field(entry, "date", at),
    )


def _require_object(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {kind(value)}")


def _field(record: Mapping[str, Any], key: str, where: str) -> str:
    """A required text field; numbers are converted to strings."""
    if key not in record:
        raise DataError(f"{where}: lacks field {key!r}")
    value = record[key]
    if not _is_scalar(value):
        raise DataError(f"{where}: field {key!r} must be a string or number, got {kind(value)}")
    text = _as_text(value)
    if _SURROGATE.search(text):
        raise DataError(f"{where}: field {key!r} holds a lone surrogate (an unpaired \\ud800-\\udfff escape), which is not text")
    return text


def _safe_id(value: str, where: str) -> str:
    if not _SAFE_ID.fullmatch(value):
        raise DataError(f"{where}: id {value!r} is unsafe as a file name ({_SAFE_ID_RULE})")
    return value


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool)


def _as_text(value: str | int | float) -> str:
    return value if isinstance(value, str) else str(value)


def _numeric_dates(dates: list[str]) -> list[float] | None:
    """The dates as numbers, or None unless every one parses as a number."""
    try:
        return [float(date) for date in dates]
    except ValueError:
        return None
