"""Retrieval over a user's own history (issue 29): only the user's items older than what is
asked, never itself, the most similar first, dropped whole over the budget, deterministic."""

from __future__ import annotations

import numpy as np
import pytest

from cbpo_orch.data.records import Example
from cbpo_orch.data.retrieval import Asked, bm25_scores, default_k, fitted_prompt, render_items, retrieve, with_context
from cbpo_orch.data.tasks import load_task


def _items(n: int, user: str = "u") -> list[Example]:
    return [Example(x=f"prompt {i}", y=f"answer {i}", item_id=f"{user}-{i}", user_id=user) for i in range(n)]


def test_an_item_retrieves_only_older_items_the_most_similar_first():
    items = _items(6)
    scores = np.array([0.1, 0.9, 0.5, 0.7, 0.99, 0.95])  # items 4 and 5 are newer than the asked one
    asked = Asked("u-4", "prompt 4", "answer 4", before=4)
    assert [e.item_id for e in retrieve(items, scores, asked, k=3)] == ["u-1", "u-3", "u-2"]


def test_a_query_sees_every_item_but_never_one_with_its_own_prompt():
    items = _items(4)
    scores = np.array([0.2, 0.3, 1.0, 0.1])
    asked = Asked("q", " prompt  2\n", None, before=4)  # the same prompt as item 2, spaced otherwise
    assert [e.item_id for e in retrieve(items, scores, asked, k=4)] == ["u-1", "u-0", "u-3"]


def test_ties_go_to_the_newer_item_and_the_ranking_is_repeatable():
    items = _items(5)
    scores = np.array([0.5, 0.5, 0.2, 0.5, 0.1], dtype=np.float32)
    asked = Asked("q", "query", None, before=5)
    first = [e.item_id for e in retrieve(items, scores, asked, k=2)]
    assert first == ["u-3", "u-1"]
    assert all([e.item_id for e in retrieve(items, scores.copy(), asked, k=2)] == first for _ in range(5))


def test_items_over_the_budget_are_dropped_whole_the_least_similar_first():
    items = _items(3)
    length = len  # one "token" a character
    full = with_context(render_items(items), "the query")
    assert fitted_prompt(items, "the query", length, len(full)) == (full, 3)
    two = with_context(render_items(items[:2]), "the query")
    assert fitted_prompt(items, "the query", length, len(full) - 1) == (two, 2)
    assert fitted_prompt(items, "the query", length, len("the query")) == ("the query", 0)


def test_bm25_scores_only_the_older_items_and_ranks_shared_rare_words_first():
    texts = [("Write: the senate votes on the budget", "Senate Votes"), ("Write: a cat is rescued", "Cat Rescued"), ("Write: senate budget", "Budget")]
    items = [Example(x, y, f"u-{i}", "u") for i, (x, y) in enumerate(texts)]
    scores = bm25_scores(items, Asked("q", "Write: senate budget", None, before=2))
    assert len(scores) == 2 and scores[0] > 5 * scores[1]
    assert len(bm25_scores(items, Asked("q", "Write: senate budget", None, before=0))) == 0


def test_default_k_is_four_for_short_tasks_and_two_for_long_ones():
    assert [default_k(load_task(name)) for name in ("lamp4", "lamp5", "commit-subject", "longlamp2", "longlamp4")] == [4, 4, 4, 2, 2]


def _rag(sample_history, tmp_path_factory, k: int = 3, retriever: str = "embedding"):
    from types import SimpleNamespace

    from cbpo_orch.method.config import TrainConfig
    from cbpo_orch.training.models import load_tokenizer
    from cbpo_orch.workers.prompts import UserAsk, compose
    from tests.tiny_model import build_tiny_model

    dataset, history = sample_history
    users = {}
    for user_id, user in dataset.users.items():
        items = dataset.examples(user_id)
        asked = [Asked(q.id, dataset.task.prompt(q), q.gold, len(items)) for q in user.queries]
        asked += [Asked(e.item_id, e.x, e.y, len(items) - 3 + j) for j, e in enumerate(items[-3:])]
        users[user_id] = UserAsk(items, asked)
    tokenizer = load_tokenizer(build_tiny_model(tmp_path_factory.mktemp("tiny")))
    context = SimpleNamespace(task=dataset.task, history=history, loaded=SimpleNamespace(tokenizer=tokenizer))
    config = TrainConfig(method="rag", retrieve=k, retriever=retriever)
    return users, compose(context, list(users.values()), config, dataset.task.budgets(2048))


@pytest.mark.parametrize("retriever", ["embedding", "bm25"])
def test_rag_on_the_sample_retrieves_only_the_users_own_older_items_and_again_the_same(sample_history, tmp_path_factory, retriever):
    users, composed = _rag(sample_history, tmp_path_factory, retriever=retriever)
    for (user_id, user), own in zip(users.items(), composed):
        ids = [e.item_id for e in user.items]
        assert own.record == {"retrieve": 3, "retriever": retriever}
        for asked, prompt, carried in zip(user.asked, own.prompts, own.carried):
            assert len(carried) == 3 and asked.id not in carried
            assert all(ids.index(item) < asked.before for item in carried)  # the user's own, older items only
            chosen = [user.items[ids.index(item)] for item in carried]
            assert prompt == with_context(render_items(chosen), asked.prompt)
    assert [own.carried for own in _rag(sample_history, tmp_path_factory, retriever=retriever)[1]] == [own.carried for own in composed]


def test_rag_ranks_by_the_asked_prompts_embedding(sample_history, tmp_path_factory):
    """The first item a query retrieves is its nearest older item by the job's embedder."""
    from cbpo_orch.data.embedding import embed, load_embedder

    _, history = sample_history
    users, composed = _rag(sample_history, tmp_path_factory, k=1)
    user = next(iter(users.values()))
    vectors = embed(load_embedder(), [a.prompt for a in user.asked])
    similarity = vectors @ history.embeddings[history.rows(user.items)].T
    for asked, row, carried in zip(user.asked, similarity, composed[0].carried):
        assert carried == [user.items[int(np.argmax(row[: asked.before]))].item_id]


def test_the_asked_prompts_are_embedded_by_the_embedder_the_history_was_embedded_by(sample_history, tmp_path_factory, monkeypatch):
    """A job with its own embedder (``--embedder``) ranks by that embedder's vectors, the ones its
    history index holds; the index carries the name from the cache to the workers."""
    from dataclasses import replace

    from cbpo_orch.workers import embedding
    from cbpo_orch.workers.context import cached_history, history_datasets

    dataset, history = sample_history
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setattr("cbpo_orch.workers.context.build_history", lambda datasets, name, embed_texts=None: replace(history, embedder=name))
    datasets = history_datasets(dataset.path, "dev", dataset.task)
    assert [cached_history(cache, datasets, "my-embedder").embedder for _ in ("built", "loaded")] == ["my-embedder"] * 2
    names = []

    def fake_embed(texts, name, threads):
        names.append(name)
        return np.ones((len(texts), history.embeddings.shape[1]), dtype=np.float32)

    monkeypatch.setattr(embedding, "embed_shard", fake_embed)
    _rag((dataset, replace(history, embedder="my-embedder")), tmp_path_factory)
    assert names == ["my-embedder"]
