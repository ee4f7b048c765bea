"""The embedded histories of a task's users: every profile pair, its embedding, and a
FAISS index over them (METHOD.md §4, §5).

Built once per (task, data, embedding model) and reused: auxiliary items for any user
come from it, and so do the embeddings that γ is estimated on. Only profile items are
indexed, never queries, and the loader has left out every profile item equal to a query of
any split (see :mod:`cbpo_orch.data.dataset`), so no test query can become an auxiliary item;
a user's positives come through the same loader, so each of them has a row.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from cbpo_orch.data.auxiliary import AuxIndex
from cbpo_orch.data.dataset import Dataset
from cbpo_orch.data.records import Example
from cbpo_orch.data.embedding import pair_text
from cbpo_orch.data.errors import DataError


@dataclass
class HistoryIndex:
    """``embedder``: the embedding model's name the rows were embedded by (None: the default),
    which embeds the prompts that retrieval asks with too."""

    examples: list[Example]
    embeddings: np.ndarray
    index: AuxIndex
    embedder: str | None = None

    @classmethod
    def from_examples(cls, examples: list[Example], embeddings: np.ndarray, embedder: str | None = None) -> "HistoryIndex":
        index = AuxIndex(embeddings, [e.user_id for e in examples], [e.item_id for e in examples])
        return cls(examples, embeddings, index, embedder)

    def rows(self, examples: list[Example]) -> list[int]:
        """Row numbers of ``examples`` (matched by user and item id); DataError for an item the
        index left out: its user was forgotten (``cbpo-orch forget``) after the index was built."""
        try:
            return [self._rows[(e.user_id, e.item_id)] for e in examples]
        except KeyError as missing:
            user = missing.args[0][0]
            raise DataError(
                f"user {user} was forgotten (cbpo-orch forget): this data's history index leaves its items out, so it is not "
                "trained on this data again; data where its history differs builds a new index"
            ) from None

    @cached_property
    def _rows(self) -> dict[tuple[str, str], int]:
        return {(e.user_id, e.item_id): row for row, e in enumerate(self.examples)}

    def auxiliary(self, user_id: str, own_rows: list[int], n: int, strategy: str, seed: int) -> list[int]:
        """``n`` rows of other users' items by ``strategy``, relative to the user's centroid."""
        centroid = self.embeddings[own_rows].mean(axis=0)
        return self.index.select(user_id, n, strategy, centroid=centroid, seed=seed)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "embeddings.npy", self.embeddings)
        self.index.save(folder / "faiss")
        with open(folder / "examples.jsonl", "w", encoding="utf-8") as out:
            for example in self.examples:
                out.write(json.dumps(asdict(example)) + "\n")

    @classmethod
    def load(cls, folder: Path, embedder: str | None = None) -> "HistoryIndex":
        with open(folder / "examples.jsonl", encoding="utf-8") as lines:
            examples = [Example(**json.loads(line)) for line in lines]
        return cls(examples, np.load(folder / "embeddings.npy"), AuxIndex.load(folder / "faiss"), embedder)


def build_history_index(datasets: list[Dataset], embed_texts: Callable[[list[str]], np.ndarray], embedder: str | None = None) -> HistoryIndex:
    """Embed every profile pair of every user in ``datasets`` (``embed_texts``: texts to
    unit-norm rows, in order, by the model named ``embedder``) and index them."""
    examples = [example for dataset in datasets for example in dataset.profile_examples()]
    return HistoryIndex.from_examples(examples, embed_texts([pair_text(e.x, e.y) for e in examples]), embedder)
