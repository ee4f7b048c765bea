"""Auxiliary-set selection over a per-task FAISS index (METHOD.md §5).

The index holds the embeddings of users' profile items (the caller never puts test
queries in it). For a target user, ``AuxIndex.select`` returns rows owned by other
users only, by strategy: "random" (the paper's default), "nearest" (closest to the
target's profile centroid: high overlap) or "farthest" (lowest cosine: unique).
Vectors are L2-normalised, so inner product is cosine similarity.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

STRATEGIES = ("random", "nearest", "farthest")
_INDEX_FILE = "index.faiss"
_META_FILE = "meta.json"


def _normalise(vectors: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation to float32 (zero rows stay zero)."""
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def profile_centroid(embeddings: np.ndarray) -> np.ndarray:
    """Unit-norm centroid [D] of L2-normalised embeddings [K, D] (a user's profile)."""
    if len(embeddings) == 0:
        raise ValueError("cannot take the centroid of no embeddings")
    return _normalise(_normalise(embeddings).mean(axis=0))[0]


class AuxIndex:
    """Inner-product FAISS index of profile items, with each row's owner and item id."""

    def __init__(self, embeddings: np.ndarray, owners: Sequence[str], item_ids: Sequence[str]) -> None:
        """Index ``embeddings`` [M, D] (L2-normalised here); row i belongs to ``owners[i]``."""
        vectors = _normalise(embeddings)
        if not len(vectors) == len(owners) == len(item_ids):
            raise ValueError(
                f"{len(vectors)} embeddings, {len(owners)} owners and {len(item_ids)} item ids differ in length"
            )
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        self._init(index, owners, item_ids)

    def _init(self, index: faiss.IndexFlatIP, owners: Sequence[str], item_ids: Sequence[str]) -> None:
        self._index = index
        self.owners = [str(o) for o in owners]
        self.item_ids = [str(i) for i in item_ids]
        self._owner_array = np.asarray(self.owners, dtype=object)

    def __len__(self) -> int:
        return self._index.ntotal

    @property
    def dim(self) -> int:
        """Embedding dimension D."""
        return self._index.d

    def rows_of(self, user: str) -> np.ndarray:
        """Row indices owned by ``user`` (ascending)."""
        return np.flatnonzero(self._owner_array == user)

    def vectors(self, rows: Sequence[int]) -> np.ndarray:
        """The stored (normalised) vectors of ``rows`` [len(rows), D]."""
        return self._index.reconstruct_batch(np.asarray(rows, dtype=np.int64))

    def user_centroid(self, user: str) -> np.ndarray:
        """Unit-norm centroid of the rows ``user`` owns in the index."""
        rows = self.rows_of(user)
        if len(rows) == 0:
            raise ValueError(f"user {user!r} owns no rows in the index; pass a centroid")
        return profile_centroid(self.vectors(rows))

    def select(
        self,
        target_user: str,
        n: int,
        strategy: str,
        centroid: np.ndarray | None = None,
        seed: int = 0,
    ) -> list[int]:
        """Row indices of ``n`` auxiliary items for ``target_user``, never rows it owns.

        "random": uniform without replacement among other users' rows, in sampled
        order, deterministic given ``seed``. "nearest" / "farthest": highest / lowest
        cosine to ``centroid`` (default: the target's centroid in the index), in that
        order. Fewer than ``n`` rows are returned only when fewer other rows exist.
        """
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
        own = self.rows_of(target_user)
        n = min(n, len(self) - len(own))
        if n <= 0:
            return []
        if strategy == "random":
            candidates = np.flatnonzero(self._owner_array != target_user)
            rng = np.random.default_rng(seed)
            return [int(r) for r in rng.choice(candidates, size=n, replace=False)]
        query = _normalise(self.user_centroid(target_user) if centroid is None else centroid)
        if strategy == "farthest":
            query = -query
        _, found = self._index.search(query, n + len(own))
        own_set = set(own.tolist())
        return [int(r) for r in found[0] if r >= 0 and int(r) not in own_set][:n]

    def save(self, directory: str | Path) -> None:
        """Write the index and its owners / item ids into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self._index, str(directory / _INDEX_FILE))
        meta = {"owners": self.owners, "item_ids": self.item_ids}
        (directory / _META_FILE).write_text(json.dumps(meta), encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> AuxIndex:
        """Read an index written by ``save``."""
        directory = Path(directory)
        meta = json.loads((directory / _META_FILE).read_text(encoding="utf-8"))
        index = faiss.read_index(str(directory / _INDEX_FILE))
        if index.ntotal != len(meta["owners"]):
            raise ValueError(f"{directory}: index has {index.ntotal} rows but metadata {len(meta['owners'])}")
        loaded = cls.__new__(cls)
        loaded._init(index, meta["owners"], meta["item_ids"])
        return loaded
