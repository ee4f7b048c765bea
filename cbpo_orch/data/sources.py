"""Where a data set's splits come from, in whichever form a user holds it.

``open_source`` takes what ``--data`` names:

- a folder of split files: LaMP's ``{split}_questions.json`` (golds in ``{split}_outputs.json``),
  rows as ``{split}.json`` / ``{split}.jsonl``, or rows as parquet shards named as the Hugging
  Face hub names them (``{split}-00000-of-00001.parquet``, or ``{split}.parquet``);
- one parquet file, its split taken from its name the same way;
- a folder written by ``datasets``' ``save_to_disk``: a ``DatasetDict`` (one split a folder),
  or one ``Dataset`` (the split it was saved from, else the folder's name);
- a hub id ``OWNER/NAME`` or ``OWNER/NAME:CONFIG``, read with ``datasets.load_dataset``, which
  takes it from the ``datasets`` cache where it is there and honours ``HF_HUB_OFFLINE``.

A split is asked for by name; ``dev``, ``val`` and ``validation`` name the same split, whichever
of them the source holds. Every form gives a split as one of two shapes, which
:mod:`cbpo_orch.data.dataset` turns into users by one path: :class:`LampFiles` (questions and
golds apart) or :class:`Rows` (each record a query with its user's profile). Rows held in
Arrow (parquet, ``datasets``) are read a batch at a time, so that no split is ever held whole
as Python objects, and records come without their null fields (Arrow gives every item of a
list of structs every field, null where an item lacks it).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Union

from cbpo_orch.data.errors import DataError, kind
from cbpo_orch.home import SAMPLE_DATA

LONGLAMP = "LongLaMP/LongLaMP"
LONGLAMP_CONFIGS = {
    "longlamp2": "abstract_generation_user",
    "longlamp3": "product_review_user",
    "longlamp4": "topic_writing_user",
}
"""The hub's user-split config of each long task (LongLaMP-3 is product review and -4 topic
writing, as on the hub and in the paper; some code bases swap the two)."""

SPLIT_ALIASES = (("dev", "val", "validation"),)
"""Split names that name one split: a source holds at most one of each group."""

ARROW_BATCH_ROWS = 64
"""Rows converted to Python objects at a time: a few hundred profile items each, a few MB."""

_SHARD = re.compile(r"(?P<split>[^-]+?)(?:-\d{5}-of-\d{5})?\.parquet")
_HUB_ID = re.compile(r"(?P<name>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?::(?P<config>[\w.-]+))?")


def aliases(split: str) -> tuple[str, ...]:
    """The names that name ``split``: itself first, then its aliases."""
    group = next((group for group in SPLIT_ALIASES if split in group), ())
    return (split, *(name for name in group if name != split))


@dataclass(frozen=True)
class LampFiles:
    """A split in LaMP's layout: the questions (each ``{"id", "input", "profile", "user_id"?}``)
    and the file of their golds, which may be absent."""

    questions: Path
    outputs: Path


@dataclass(frozen=True)
class Rows:
    """A split as rows; ``read()`` yields ``(where, record)``, ``where`` naming the record's
    file or data set and its place there, as errors must."""

    name: str
    read: Callable[[], Iterator[tuple[str, Any]]]


Split = Union[LampFiles, Rows]


class Source:
    """A data set: its splits, each readable as :data:`Split`, and its queries' inputs."""

    ref: str
    """What reopens it anywhere (an absolute path, or the hub id): a job stores this."""

    def splits(self) -> tuple[str, ...]:
        """The names of the splits it holds, sorted."""
        raise NotImplementedError

    def held(self, name: str) -> str:
        """The name under which it holds split ``name`` (itself or an alias); DataError where
        it holds none or several."""
        held = [alias for alias in aliases(name) if alias in self.splits()]
        if not held:
            raise DataError(f"{self.ref}: no split {name!r} ({self._looked_for(name)}splits found: {', '.join(self.splits()) or 'none'})")
        if len(held) > 1:
            raise DataError(f"{self.ref}: split {name!r} is ambiguous: both {self._shown(held[0])} and {self._shown(held[1])} exist")
        return held[0]

    def split(self, name: str) -> Split:
        """The split named ``name`` or one of its aliases (see :meth:`held`)."""
        return self._split(self.held(name))

    def inputs(self) -> Iterator[Any]:
        """The ``input`` of every record of every split, read leniently: every record that has
        one counts (even in a split that fails validation), a record that is no object has none."""
        raise NotImplementedError

    def _split(self, name: str) -> Split:
        raise NotImplementedError

    def _looked_for(self, name: str) -> str:
        return ""

    def _shown(self, split: str) -> str:
        return repr(split)


def task_data(data: str | os.PathLike[str] | None, task: str) -> str | os.PathLike[str]:
    """What a job of ``task`` reads: ``data`` where given, else the task's default data set: a
    long task's LongLaMP config on the hub, the shipped HuffPost sample for any other. The hub
    id ``LongLaMP/LongLaMP`` without a config means the task's config."""
    if data is None:
        return f"{LONGLAMP}:{LONGLAMP_CONFIGS[task]}" if task in LONGLAMP_CONFIGS else SAMPLE_DATA
    if os.fspath(data) == LONGLAMP and task in LONGLAMP_CONFIGS and not Path(data).exists():
        return f"{LONGLAMP}:{LONGLAMP_CONFIGS[task]}"
    return data


def open_source(data: str | os.PathLike[str]) -> Source:
    """The source ``data`` names: a local path where one exists, else a hub id; DataError
    where it is neither."""
    path = Path(data)
    if path.is_file():
        if path.suffix != ".parquet":
            raise DataError(f"{path}: not a data folder, a parquet file or a save_to_disk folder")
        return ParquetFile(path.resolve())
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return SavedDataset(path.resolve())
        return FileFolder(path.resolve())
    hub = _HUB_ID.fullmatch(os.fspath(data))
    if hub and not os.fspath(data).startswith((".", "/", "~")):
        return HubDataset(hub["name"], hub["config"])
    raise DataError(f"{path}: no such data folder (nor a parquet file, nor a hub id OWNER/NAME[:CONFIG])")


class FileFolder(Source):
    """A folder of split files: LaMP's pairs, JSON/JSONL rows, parquet shards."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ref = str(folder)

    def splits(self) -> tuple[str, ...]:
        return tuple(sorted({split for split, _ in self._files()}))

    def inputs(self) -> Iterator[Any]:
        for _, file in self._files():
            if file.suffix == ".parquet":
                yield from _parquet_inputs(file)
                continue
            data = [record for _, record in json_records(file)] if file.suffix == ".jsonl" else read_json(file)
            for record in data if isinstance(data, list) else ():
                if isinstance(record, dict) and "input" in record:
                    yield record["input"]

    def _files(self) -> list[tuple[str, Path]]:
        """(split, file) of every split file of the folder; a LaMP outputs file is no split's."""
        found = []
        for file in sorted(self.folder.iterdir()):
            if file.name.endswith("_questions.json"):
                found.append((file.name.removesuffix("_questions.json"), file))
            elif file.suffix in (".json", ".jsonl") and not file.stem.endswith(("_questions", "_outputs")):
                found.append((file.stem, file))
            elif shard := _SHARD.fullmatch(file.name):
                found.append((shard["split"], file))
        return found

    def _split(self, name: str) -> Split:
        files = [file for split, file in self._files() if split == name]
        kinds = sorted({_file_kind(file) for file in files})
        if len(kinds) > 1:
            first, second = (next(f for f in files if _file_kind(f) == k) for k in kinds[:2])
            raise DataError(f"{self.ref}: split {name!r} is ambiguous: both {first.name} and {second.name} exist")
        if kinds == ["lamp"]:
            return LampFiles(files[0], self.folder / f"{name}_outputs.json")
        if kinds == ["parquet"]:
            return Rows(self.ref, lambda: (row for file in files for row in _parquet_rows(file)))
        return Rows(str(files[0]), lambda: ((f"{files[0]}: {label}", record) for label, record in json_records(files[0])))

    def _looked_for(self, name: str) -> str:
        names = ", ".join(f"{name}_questions.json, {name}.json, {name}.jsonl, {name}-*.parquet" for name in aliases(name))
        return f"looked for {names}; "

    def _shown(self, split: str) -> str:
        return next(file.name for name, file in self._files() if name == split)


def _file_kind(file: Path) -> str:
    if file.name.endswith("_questions.json"):
        return "lamp"
    return "parquet" if file.suffix == ".parquet" else "rows"


class ParquetFile(Source):
    """One parquet file of rows: the one split its name names."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self.ref = str(file)
        shard = _SHARD.fullmatch(file.name)
        self._name = shard["split"] if shard else file.stem

    def splits(self) -> tuple[str, ...]:
        return (self._name,)

    def inputs(self) -> Iterator[Any]:
        return _parquet_inputs(self.file)

    def _split(self, name: str) -> Split:
        return Rows(self.ref, lambda: _parquet_rows(self.file))


class _ArrowSplits(Source):
    """A source whose splits are ``datasets.Dataset`` objects (memory-mapped Arrow tables)."""

    def _datasets(self) -> dict[str, Any]:
        raise NotImplementedError

    def splits(self) -> tuple[str, ...]:
        return tuple(sorted(self._datasets()))

    def inputs(self) -> Iterator[Any]:
        for dataset in self._datasets().values():
            if "input" in dataset.column_names:
                for batch in dataset.select_columns(["input"]).with_format("arrow").iter(batch_size=1024):
                    yield from batch.column("input").to_pylist()

    def _split(self, name: str) -> Split:
        dataset = self._datasets()[name]
        where = f"{self.ref} split {name!r}"
        return Rows(where, lambda: _arrow_rows(dataset.with_format("arrow").iter(batch_size=ARROW_BATCH_ROWS), where))


class SavedDataset(_ArrowSplits):
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ref = str(folder)

    def _datasets(self) -> dict[str, Any]:
        return _load_from_disk(self.folder)


@lru_cache(maxsize=4)
def _load_from_disk(folder: Path) -> dict[str, Any]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as error:  # noqa: BLE001 — any reason it does not load is the user's data's
        raise DataError(f"{folder}: cannot read this save_to_disk folder ({_first_line(error)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        return dict(loaded)
    return {str(loaded.split) if loaded.split is not None else folder.name: loaded}


class HubDataset(_ArrowSplits):
    """A data set on the Hugging Face hub, or in the ``datasets`` cache from an earlier load."""

    def __init__(self, name: str, config: str | None) -> None:
        self.name, self.config = name, config
        self.ref = name if config is None else f"{name}:{config}"

    def _datasets(self) -> dict[str, Any]:
        return _load_hub(self.name, self.config)


@lru_cache(maxsize=4)
def _load_hub(name: str, config: str | None) -> dict[str, Any]:
    """Every split of the hub data set ``name`` (config ``config``), as ``datasets`` loads it:
    from its cache where there, without asking the hub where ``HF_HUB_OFFLINE`` is set."""
    import datasets

    ref = name if config is None else f"{name}:{config}"
    try:
        return dict(datasets.load_dataset(name, config))
    except ConnectionError as error:
        raise DataError(
            f"{ref}: neither the Hugging Face hub ({_first_line(error)}) nor the datasets cache "
            f"({datasets.config.HF_DATASETS_CACHE}) has it; load it once where the hub is reachable "
            f"(datasets.load_dataset({name!r}, {config!r}) fills the cache; HF_HOME moves it), "
            "or give --data a local copy (parquet shards or a save_to_disk folder)"
        ) from None
    except Exception as error:  # noqa: BLE001 — a bad id or config is the user's; say what datasets says
        raise DataError(f"{ref}: datasets.load_dataset cannot load it ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _parquet_rows(file: Path) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(file).iter_batches(batch_size=ARROW_BATCH_ROWS)
        yield from _arrow_rows(batches, str(file))
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{file}: cannot read as parquet ({_first_line(error)})") from None


def _parquet_inputs(file: Path) -> Iterator[Any]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        if "input" not in parquet.schema_arrow.names:
            return
        for batch in parquet.iter_batches(batch_size=1024, columns=["input"]):
            yield from batch.column("input").to_pylist()
    except (OSError, ValueError) as error:
        raise DataError(f"{file}: cannot read as parquet ({_first_line(error)})") from None


def _arrow_rows(batches, where: str) -> Iterator[tuple[str, Any]]:
    """``(f"{where}: row N", record)`` for the rows of Arrow record batches (or tables), N
    counting from 0 over all of them; null fields left out."""
    number = 0
    for batch in batches:
        for record in batch.to_pylist():
            yield f"{where}: row {number}", _without_nulls(record)
            number += 1


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_nulls(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_nulls(item) for item in value]
    return value


def json_records(file: Path) -> list[tuple[str, Any]]:
    """(label, record) pairs of a JSON list file or a JSONL file."""
    if file.suffix == ".jsonl":
        lines = read_text(file).split("\n")  # not splitlines: U+2028, U+0085 … may sit inside a JSON string
        return [
            (f"line {number}", _parse_json(line, f"{file}: line {number}"))
            for number, line in enumerate(lines, start=1)
            if line.strip()
        ]
    data = read_json(file)
    if not isinstance(data, list):
        raise DataError(f"{file}: expected a JSON list of records, got {kind(data)}")
    return [(f"record {index}", record) for index, record in enumerate(data)]


def read_json(file: Path) -> Any:
    return _parse_json(read_text(file), str(file))


def read_text(file: Path) -> str:
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
