"""Retrieval over a user's own history: the k items most like what the user is asked, put
before its prompt (the RAG baseline, and adapters that read retrieved items; issue 29).

Against leaks, the candidates of an asked prompt are the user's own items (never another
user's, never a query: the loader keeps queries out of every profile) that come before it
in the user's time order: an item asked (an evaluation or a training item) sees only the
items older than it, a query sees all of them (every profile item is older than the user's
queries). An item whose prompt equals the asked one is never a candidate, as the loader
leaves out profile items equal to a query. The ranking is a pure function of the scores:
ties go to the newer item, so retrieval is deterministic.

``k`` defaults per task (:func:`default_k`); items that do not fit the prompt budget are
dropped whole, the least similar first (:func:`fitted_prompt`), so a prompt with retrieved
items fits wherever the bare prompt does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from cbpo_orch.data.dataset import _normalised
from cbpo_orch.data.records import Example
from cbpo_orch.data.embedding import pair_text
from cbpo_orch.data.tasks import SHORT_OUTPUT_TOKENS, Task

SHORT_TASK_K = 4
"""Short tasks (headlines, titles, commit subjects): LaMP (Salemi et al., 2023) retrieves 1–4
items and finds more better up to 4; a HuffPost item renders to about 55 tokens (90th
percentile 64, SmolLM2's tokenizer), so 4 of them and the query take about 300 of the
512-token budget, room left for longer articles."""
LONG_TASK_K = 2
"""Long tasks (LongLaMP's abstracts, reviews, posts of 150–500 tokens each): two items and the
query fill about the 1,536-token budget; a third would mostly be dropped by it anyway."""


def default_k(task: Task) -> int:
    """Retrieved items per prompt when the job does not say (``--retrieve``): by the size of
    the task's completions, which the items carry (see the constants)."""
    return SHORT_TASK_K if task.max_new_tokens <= SHORT_OUTPUT_TOKENS else LONG_TASK_K


@dataclass(frozen=True)
class Asked:
    """What a user is asked: its id, its bare prompt, its gold (None where the split has none)
    and ``before``, how many of the user's items (oldest first) come before it: its
    candidates."""

    id: str
    prompt: str
    gold: str | None
    before: int


def retrieve(items: Sequence[Example], scores: np.ndarray, asked: Asked, k: int) -> list[Example]:
    """The ``k`` items among the first ``asked.before`` of ``items`` (the user's, oldest first)
    with the highest ``scores`` (one per item, or per candidate), most similar first; none
    whose prompt is the asked one."""
    same = _normalised(asked.prompt)
    candidates = [i for i in range(asked.before) if _normalised(items[i].x) != same]
    order = sorted(candidates, key=lambda i: (-float(scores[i]), -i))
    return [items[i] for i in order[:k]]


def render_items(items: Sequence[Example]) -> str:
    """Items as the task renders them (its item prompt, then the item's completion on the
    next line), a blank line between two."""
    return "\n\n".join(f"{item.x}\n{item.y}" for item in items)


def with_context(context: str, prompt: str) -> str:
    """``prompt`` after ``context`` (a blank line between), or alone without one."""
    return f"{context}\n\n{prompt}" if context else prompt


def fitted_prompt(retrieved: Sequence[Example], prompt: str, length: Callable[[str], int], budget: int) -> tuple[str, int]:
    """(``prompt`` after as many of the ``retrieved`` items, most similar first, as fit
    ``budget`` tokens by ``length``, how many): the least similar dropped first, whole."""
    for n in range(len(retrieved), 0, -1):
        text = with_context(render_items(retrieved[:n]), prompt)
        if length(text) <= budget:
            return text, n
    return prompt, 0


def embedding_scores(item_vectors: np.ndarray, asked_vectors: np.ndarray) -> np.ndarray:
    """[asked, items] cosine similarities of unit-norm embeddings."""
    return asked_vectors @ item_vectors.T


def bm25_scores(items: Sequence[Example], asked: Asked) -> np.ndarray:
    """BM25 scores (``bm25s``, English stop words) of the first ``asked.before`` items, each
    read as the embedder reads it, for the asked prompt. The index holds those items only, so
    nothing later weighs in, not even through its term statistics."""
    import bm25s  # imported here: only a bm25 job pays for it

    texts = [pair_text(item.x, item.y) for item in items[: asked.before]]
    corpus = bm25s.tokenize(texts, stopwords="en", show_progress=False)
    [query] = bm25s.tokenize([asked.prompt], stopwords="en", return_ids=False, show_progress=False)
    if not (corpus.vocab and query):  # only stop words on one side: nothing matches
        return np.zeros(len(texts), dtype=np.float32)
    index = bm25s.BM25()
    index.index(corpus, show_progress=False)
    return index.get_scores(query)
