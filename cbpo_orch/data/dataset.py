"""Per-user task data: load one split of a data folder into users, profiles and queries.

A data folder holds one file set per split, in one of two formats:

- LaMP: ``{split}_questions.json`` (a list of ``{"id", "user_id"?, "input", "profile"}``)
  and ``{split}_outputs.json`` (``{"task", "golds": [{"id", "output"}]}``; only a ``test``
  split may come without it, or with golds for some of its questions only). Without ``user_id`` every question is its own user (user id =
  question id); questions with the same ``user_id`` must carry the same profile.
- LongLaMP rows: ``{split}.json`` (a list) or ``{split}.jsonl`` (one object a line) of
  ``{"input", "output"?, "profile", "id"?}`` plus a user id under one of ``USER_ID_KEYS``.
  Rows of one user must carry the same profile. Only rows of a ``test`` split may lack ``output``.

A query without a gold (``test`` splits: LaMP's, or a product's real users) is answered and
not scored; a job may mix users with and without golds.

Against leaks (METHOD.md §5: never test queries of anyone), loading leaves out every profile
item whose prompt equals the prompt of a query of ANY split in the folder, compared after
whitespace normalisation. Every user of the result, and so positives, the auxiliary index and
the task adapter's data alike, sees only the items kept; texts shared by several users'
profiles stay, each owner keeping its copy.

Everything is validated on load; bad input raises ``DataError`` with a one-line message
naming the file and the record (``record N`` is the 0-based index in a JSON list,
``line N`` the 1-based line of a JSONL file; ``profile item N`` is 0-based).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:
    from cbpo_orch.data.tasks import Task

USER_ID_KEYS = ("user_id", "name", "reviewerId", "author")
GOLDLESS_SPLIT = "test"
"""The one split whose queries may come without gold outputs (LaMP's test split has none)."""
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_SAFE_ID_RULE = "letters, digits, '.', '_', '-' only, not starting with '.' or '-', at most 128 characters"
_SURROGATE = re.compile("[\ud800-\udfff]")


class DataError(ValueError):
    """Bad user data or task definition; the message is one line naming the file and the record."""


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
    """One split of a data folder, read with a task; ``users`` keeps the file's order and
    their profiles hold no query's text (see the module's docstring)."""

    path: Path
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


def find_splits(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """Names of the splits present in a data folder, in either format, sorted."""
    folder = Path(path)
    names = {f.name.removesuffix("_questions.json") for f in folder.glob("*_questions.json")}
    names |= {
        f.stem
        for f in folder.glob("*.json*")
        if f.suffix in (".json", ".jsonl") and not f.stem.endswith(("_questions", "_outputs"))
    }
    return tuple(sorted(names))


def load_split(path: str | os.PathLike[str], split: str, task: Task) -> Dataset:
    """Load and validate split ``split`` of the data folder ``path`` for ``task``."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such data folder")
    candidates = _split_files(folder, split)
    questions = candidates[0]
    present = [file for file in candidates if file.is_file()]
    if not present:
        looked = ", ".join(file.name for file in candidates)
        found = ", ".join(find_splits(folder)) or "none"
        raise DataError(f"{folder}: no split {split!r} (looked for {looked}; splits found: {found})")
    if len(present) > 1:
        raise DataError(f"{folder}: split {split!r} is ambiguous: both {present[0].name} and {present[1].name} exist")
    if present[0] == questions:
        users = _lamp_users(questions, folder / f"{split}_outputs.json", split, task)
    else:
        users = _row_users(present[0], split, task)
    return Dataset(path=folder, split=split, task=task, users=_without_queries(users, _query_prompts(folder, task), task))


def _split_files(folder: Path, split: str) -> tuple[Path, Path, Path]:
    """The files a split may come in: LaMP questions, a JSON list of rows, JSONL rows."""
    return folder / f"{split}_questions.json", folder / f"{split}.json", folder / f"{split}.jsonl"


def _query_prompts(folder: Path, task: Task) -> frozenset[str]:
    """The normalised prompt of every query of every split in ``folder``.

    Read leniently, so that no split's queries escape, not even those of a split that fails
    validation: every record with an ``input`` is a query; a JSON file that is not a list
    (e.g. a task definition) holds none.
    """
    prompts: set[str] = set()
    for split in find_splits(folder):
        for file in filter(Path.is_file, _split_files(folder, split)):
            data = [record for _, record in _records(file)] if file.suffix == ".jsonl" else _read_json(file)
            for record in data if isinstance(data, list) else ():
                if isinstance(record, dict) and _is_scalar(record.get("input")):
                    prompts.add(_normalised(task.prompt(Query(id="", input=_as_text(record["input"]), gold=None))))
    return frozenset(prompts)


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
    for label, record in _records(questions):
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
    data = _read_json(outputs)
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


def _row_users(file: Path, split: str, task: Task) -> dict[str, User]:
    """Users of a LongLaMP-style rows file (.json list or .jsonl)."""
    builder = _UserBuilder(file)
    for label, record in _records(file):
        _require_object(record, f"{file}: {label}")
        user_id = _row_user_id(record, f"{file}: {label}")
        where = f"{file}: {label} (user {user_id!r})"
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

    def __init__(self, file: Path) -> None:
        self._file = file
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
            raise DataError(f"{self._file}: contains no records")
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
        raise DataError(f"{where}: field 'profile' must be a list, got {_kind(raw)}")
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


def _records(file: Path) -> list[tuple[str, Any]]:
    """(label, record) pairs of a JSON list file or a JSONL file."""
    if file.suffix == ".jsonl":
        lines = _read_text(file).split("\n")  # not splitlines: U+2028, U+0085 … may sit inside a JSON string
        return [
            (f"line {number}", _parse_json(line, f"{file}: line {number}"))
            for number, line in enumerate(lines, start=1)
            if line.strip()
        ]
    data = _read_json(file)
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON list of records, got {_kind(data)}")
    return [(f"record {index}", record) for index, record in enumerate(data)]


def _read_json(file: Path) -> Any:
    return _parse_json(_read_text(file), str(file))


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{file}: cannot read ({exc})") from None


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{where}: unreadable JSON ({exc})") from None


def _require_object(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise DataError(f"{where}: expected a JSON object, got {_kind(value)}")


def _field(record: Mapping[str, Any], key: str, where: str) -> str:
    """A required text field; numbers are converted to strings."""
    if key not in record:
        raise DataError(f"{where}: lacks field {key!r}")
    value = record[key]
    if not _is_scalar(value):
        raise DataError(f"{where}: field {key!r} must be a string or number, got {_kind(value)}")
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


def _kind(value: Any) -> str:
    """A JSON name for a value's type, for error messages."""
    if value is None:
        return "null"
    return {dict: "object", list: "list", str: "string", bool: "boolean"}.get(type(value), "number")


def _numeric_dates(dates: list[str]) -> list[float] | None:
    """The dates as numbers, or None unless every one parses as a number."""
    try:
        return [float(date) for date in dates]
    except ValueError:
        return None
