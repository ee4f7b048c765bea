"""One shard of the embedding stage: a plain function, run as a Ray task per shard by the driver."""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from cbpo_orch.data.embedding import embed, load_embedder


@lru_cache(maxsize=1)
def _embedder(name: str | None):
    """The embedder, loaded once per worker process: a later shard on the same worker encodes at once."""
    return load_embedder(name)


def embed_shard(texts: list[str], embedder_name: str | None, threads: int) -> np.ndarray:
    """Unit-norm embeddings of ``texts`` by the embedder, on ``threads`` CPU threads."""
    torch.set_num_threads(max(1, threads))
    return embed(_embedder(embedder_name), texts)
