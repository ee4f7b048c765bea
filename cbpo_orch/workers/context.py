"""The job's history index: whose profiles it holds, embedded once and cached per home."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from cbpo_orch.data.dataset import Dataset, find_splits, load_split
from cbpo_orch.data.history import HistoryIndex, build_history_index
from cbpo_orch.data.tasks import Task

TASK_ADAPTER_SPLIT = "train"

EmbedTexts = Callable[[list[str]], np.ndarray]
"""Texts to their unit-norm embeddings, one row per text, in order."""


def history_datasets(data_path: str | Path, split: str, task: Task) -> list[Dataset]:
    """The test split and, when present, the train split: every user whose history may
    serve as auxiliary items."""
    splits = [split] + [s for s in find_splits(data_path) if s == TASK_ADAPTER_SPLIT and s != split]
    return [load_split(data_path, s, task) for s in splits]


def build_history(datasets: list[Dataset], embedder_name: str | None = None, embed_texts: EmbedTexts | None = None) -> HistoryIndex:
    """The history index, embedded by ``embed_texts`` (the driver's runs shards on the
    cluster) or, by default, here in this process."""
    if embed_texts is None:
        from cbpo_orch.data.embedding import embed, load_embedder

        embed_texts = partial(embed, load_embedder(embedder_name))
    return build_history_index(datasets, embed_texts, embedder_name)


def history_key(datasets: list[Dataset], embedder_name: str | None) -> str:
    """A digest of exactly what gets embedded (every profile pair, its owner and id)
    and of the embedder: equal keys mean an identical index."""
    digest = hashlib.sha256(json.dumps({"embedder": embedder_name or "default", "version": 2}).encode())
    for dataset in datasets:
        for example in dataset.profile_examples():
            digest.update(json.dumps([example.user_id, example.item_id, example.x, example.y]).encode())
    return digest.hexdigest()[:24]


def cached_history(cache_root: Path, datasets: list[Dataset], embedder_name: str | None = None, embed_texts: EmbedTexts | None = None) -> HistoryIndex:
    """The history index for ``datasets``, built once (see :func:`build_history`) and reused
    from ``cache_root``."""
    folder = cache_root / "history" / history_key(datasets, embedder_name)
    if (folder / "examples.jsonl").is_file():
        return HistoryIndex.load(folder, embedder_name)
    history = build_history(datasets, embedder_name, embed_texts)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".building-"))
    history.save(staging)
    try:
        staging.rename(folder)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return history
