"""No query of any split leaks into a profile: not into positives, the history index or the
task adapter's data (METHOD.md §5), and texts shared by several profiles never crash a user."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from cbpo_orch.data.dataset import DataError, load_split
from cbpo_orch.data.history import build_history_index
from cbpo_orch.data.tasks import load_task
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.training.models import load_model
from cbpo_orch.workers import task_adapter as worker_module
from cbpo_orch.workers.context import history_datasets, history_key
from cbpo_orch.workers.personalize import personalize_user
from cbpo_orch.workers.user_context import UserContext

TASK = load_task("lamp4")
PROMPT = "Generate a headline for the following article: "


class HashEmbedder:
    """A stand-in sentence embedder: a fixed random unit vector per text."""

    def __call__(self, texts):
        vectors = [np.random.default_rng(int(hashlib.sha1(t.encode()).hexdigest()[:8], 16)).normal(size=8) for t in texts]
        return np.stack([v / np.linalg.norm(v) for v in vectors])


def _write(folder: Path, split: str, users: dict[str, tuple[list[str], list[str]]]) -> Path:
    """A LaMP-4 split: user id -> (their query articles, their profile's article texts);
    a ``test`` split comes without golds."""
    questions = [
        {"id": f"{split}-{user}-{n}", "user_id": user, "input": PROMPT + article,
         "profile": [{"id": f"item-{text}", "text": text, "title": f"Title: {text}"} for text in profile]}
        for user, (articles, profile) in users.items()
        for n, article in enumerate(articles)
    ]
    (folder / f"{split}_questions.json").write_text(json.dumps(questions))
    if split != "test":
        golds = [{"id": q["id"], "output": f"gold {q['id']}"} for q in questions]
        (folder / f"{split}_outputs.json").write_text(json.dumps({"task": "LaMP_4", "golds": golds}))
    return folder


@pytest.fixture
def leaky(tmp_path) -> Path:
    """dev d1's query sits (respaced) in train t1's profile; dev d2's query in d1's profile;
    the test split's query in t1's profile; every user holds the reposted "shared story"."""
    _write(tmp_path, "dev", {"d1": (["dev query one"], ["d1 own", "d1 older", "dev query two", "shared story"]),
                             "d2": (["dev query two"], ["d2 own", "shared story"])})
    _write(tmp_path, "train", {"t1": (["train query"], ["t1 own", "dev  query\none ", "test query", "shared story"])})
    return _write(tmp_path, "test", {"x1": (["test query"], ["x1 own"])})


def _texts(examples) -> set[str]:
    return {e.x.removeprefix(PROMPT) for e in examples}


def test_no_query_of_any_split_is_indexed(leaky):
    history = build_history_index(history_datasets(leaky, "dev", TASK), HashEmbedder())
    assert {e.user_id for e in history.examples} == {"d1", "d2", "t1"}
    assert _texts(history.examples) == {"d1 own", "d1 older", "d2 own", "t1 own", "shared story"}


def test_task_adapter_trains_on_no_query_of_any_split(leaky, monkeypatch):
    taught = []  # the data the task adapter is trained on: every profile pair of it

    def capture(loaded, dataset, config, on_step=None):
        taught.extend(dataset.profile_examples())
        raise InterruptedError  # stop before any training

    monkeypatch.setattr(worker_module, "load_model", lambda *a: None)
    monkeypatch.setattr(worker_module, "train_task_adapter", capture)
    with pytest.raises(InterruptedError):
        worker_module.build_task_adapter("lamp4", str(leaky), "model", TrainConfig(method="sft"))
    assert _texts(taught) == {"t1 own", "shared story"}


def test_a_query_in_another_users_profile_leaves_their_positives_and_they_run(leaky, tiny_model_dir):
    datasets = history_datasets(leaky, "dev", TASK)
    history = build_history_index(datasets, HashEmbedder())
    positives = datasets[0].examples("d1")
    assert _texts(positives) == {"d1 own", "d1 older", "shared story"}
    assert [history.examples[row] for row in history.rows(positives)] == positives

    context = UserContext(task=TASK, dataset=load_split(leaky, "dev", TASK), history=history, loaded=load_model(tiny_model_dir, "cpu"))
    config = TrainConfig(method="cbpo", epochs=1, max_new_tokens=4, aux_ratio=1.0)
    outcome = personalize_user(context, "d1", config)
    assert outcome.metrics["n_pos"] == 3 and outcome.metrics["n_aux"] == 3


def test_users_sharing_profile_texts_all_get_rows(tmp_path):
    # four co-authors: each one's latest article (their query) is also in the next one's profile
    users = {f"u{i}": ([f"article {i}"], [f"article {(i + 1) % 4}", f"own {i}", "repost"]) for i in range(4)}
    dataset = load_split(_write(tmp_path, "dev", users), "dev", TASK)
    history = build_history_index([dataset], HashEmbedder())
    for user in users:
        rows = history.rows(dataset.examples(user))
        assert _texts(history.examples[row] for row in rows) == {f"own {user[1:]}", "repost"}
    assert sum(e.x == PROMPT + "repost" for e in history.examples) == 4


def test_history_key_changes_when_the_exclusion_does(leaky):
    before = history_key(history_datasets(leaky, "dev", TASK), None)
    _write(leaky, "test", {"x1": (["another test query"], ["x1 own"])})
    after = history_datasets(leaky, "dev", TASK)
    assert "test query" in _texts(after[1].profile_examples())
    assert history_key(after, None) != before


def test_a_profile_made_only_of_queries_fails_that_user_alone(tmp_path):
    _write(tmp_path, "dev", {"u": (["story"], ["own"]), "v": (["other"], ["story"])})
    dataset = load_split(tmp_path, "dev", TASK)
    assert [e.user_id for e in dataset.profile_examples()] == ["u"]
    with pytest.raises(DataError, match="user 'v' of split 'dev' has no profile item left") as error:
        dataset.examples("v")
    assert "\n" not in str(error.value)


def test_files_that_are_not_splits_hold_no_queries(leaky):
    (leaky / "task.json").write_text(json.dumps({"name": "t", "item_prompt": "{text}", "item_target": "{title}"}))
    (leaky / "source.jsonl").write_text(json.dumps({"headline": "h", "authors": "a"}) + "\n")
    assert len(load_split(leaky, "dev", TASK).profile_examples()) == 5
