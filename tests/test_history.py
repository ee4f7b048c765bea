"""The history index: cached on disk with its FAISS index, reused, never holding a query."""

from cbpo_orch.data.history import HistoryIndex
from cbpo_orch.data.tasks import load_task
from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.workers import context as context_module
from cbpo_orch.workers.context import cached_history, history_datasets


def test_saved_index_selects_exactly_as_the_built_one(sample_history, tmp_path):
    _, history = sample_history
    history.save(tmp_path / "h")
    loaded = HistoryIndex.load(tmp_path / "h")
    assert loaded.examples == history.examples
    user = history.examples[0].user_id
    own = [row for row, e in enumerate(history.examples) if e.user_id == user]
    for strategy in ("random", "nearest", "farthest"):
        assert loaded.auxiliary(user, own, 10, strategy, seed=3) == history.auxiliary(user, own, 10, strategy, seed=3)


def test_second_job_reuses_the_cache(sample_history, tmp_path, monkeypatch):
    datasets = history_datasets(SAMPLE_DATA, "dev", load_task("lamp4"))
    monkeypatch.setattr(context_module, "build_history", lambda *a, **k: sample_history[1])
    first = cached_history(tmp_path, datasets)

    def must_not_embed(*args, **kwargs):
        raise AssertionError("the cached history should have been reused")

    monkeypatch.setattr(context_module, "build_history", must_not_embed)
    second = cached_history(tmp_path, datasets)
    assert second.examples == first.examples
    assert (second.embeddings == first.embeddings).all()


def test_no_query_is_ever_indexed(sample_history):
    dataset, history = sample_history
    queries = {dataset.task.prompt(q) for user in dataset.users.values() for q in user.queries}
    assert queries and not queries & {e.x for e in history.examples}
