"""The job's one π_ref pass: it foresees exactly the pairs a worker trains on (positives and
aux, the held-out slice left out) and keys them as the worker's memo does, so a worker that
starts from it computes none of them and trains as it would alone (tiny random-weight model)."""

from __future__ import annotations

import math

import pytest

from cbpo_orch.data.tasks import load_task
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.storage.reference_cache import LEFT_OUT, pair_text_key
from cbpo_orch.workers.personalize import personalize_users
from cbpo_orch.workers.user_context import load_user_context
from cbpo_orch.workers.reference_pass import reference_shard
from cbpo_orch.workers.user_items import trained_pairs, user_items

TASK = load_task("lamp4")


@pytest.mark.parametrize("method", ["cbpo", "bco"])
def test_a_worker_started_from_the_jobs_pass_computes_no_pair_and_trains_the_same(tiny_model_dir, sample_history, method):
    dataset, history = sample_history
    config = TrainConfig(method=method, lr=5e-3, epochs=2, batch_size=8, max_profile=12, max_prompt_tokens=128, max_new_tokens=12, selection=True)
    users = list(dataset.users)[:2]
    planned = [user_items(dataset, history, user, config) for user in users]
    assert all(items.held_out for items in planned), "selection holds items out: the pass must leave them out too"
    pairs = trained_pairs(planned)
    entries = reference_shard(pairs, str(tiny_model_dir), None, TASK.budgets(128, 12), config.eval_batch_size, 1)
    values = dict(entries.values())
    assert len(entries) == len(values) == len(pairs), "every pair fits: each has its own value"

    seeded = load_user_context(TASK, dataset, history, tiny_model_dir, None, "cpu", values)
    fresh = load_user_context(TASK, dataset, history, tiny_model_dir, None, "cpu")
    together, alone = personalize_users(seeded, users, config), personalize_users(fresh, users, config)

    assert seeded.reference.computed == 0
    assert fresh.reference.computed == len(values), "the pass computed what a worker needs, no more"
    for a, b in zip(together, alone):
        assert a.metrics["losses"] == pytest.approx(b.metrics["losses"], rel=1e-5, abs=1e-6)
        assert a.predictions == b.predictions


def test_a_shards_entries_are_found_by_text_and_a_pair_over_budget_is_left_out(tiny_model_dir, sample_history):
    dataset, history = sample_history
    planned = [user_items(dataset, history, user, TrainConfig(method="cbpo", max_profile=8)) for user in list(dataset.users)[:2]]
    budgets = TASK.budgets(128, 12)
    too_long = ("word " * 400, "a headline")
    pairs = [*trained_pairs(planned), too_long]
    entries = reference_shard(pairs, str(tiny_model_dir), None, budgets, 4, 1)
    assert list(entries) == [pair_text_key(x, y, 128, 12) for x, y in pairs]
    key, value = entries[pair_text_key(*too_long, 128, 12)]
    assert key == LEFT_OUT[0] and math.isnan(value)
    halves = {**reference_shard(pairs[:5], str(tiny_model_dir), None, budgets, 4, 1), **reference_shard(pairs[5:], str(tiny_model_dir), None, budgets, 4, 1)}
    assert halves.keys() == entries.keys()
    for text_key, (key, value) in entries.items():
        assert halves[text_key][0] == key and (math.isnan(value) or halves[text_key][1] == pytest.approx(value, abs=1e-4))
    assert pair_text_key(*pairs[0], 128, 12) != pair_text_key(*pairs[0], 128, 16), "other budgets, other pairs"


def test_a_retrieve_runs_worker_finds_every_pair_in_the_jobs_pass_and_trains_the_same(tiny_model_dir, sample_history, tmp_path, monkeypatch):
    """cbpo --retrieve 2: the driver composes the runs' training prompts (each item after the
    user's items retrieved for it) before π_ref's pass, so the pass holds every pair a worker
    trains on, not the bare pairs, and a worker started from it computes none."""
    from types import SimpleNamespace

    from cbpo_orch.home import SAMPLE_DATA
    from cbpo_orch.orchestrator import driver, scheduler
    from cbpo_orch.orchestrator.spec import JobSpec, Resources
    from cbpo_orch.orchestrator.workspace import Workspace
    from tests.in_process import map_here

    monkeypatch.setattr(scheduler, "map_shards", map_here)
    dataset, history = sample_history
    users = list(dataset.users)[:1]
    config = TrainConfig(method="cbpo", retrieve=2, lr=5e-3, epochs=1, batch_size=8, max_profile=8, max_prompt_tokens=384, max_new_tokens=8)
    spec = JobSpec(task="lamp4", data=str(SAMPLE_DATA), split="dev", model=str(tiny_model_dir), methods=("cbpo",), users=tuple(users), train=config)
    planned = driver._planned_items(spec, dataset, history, [SimpleNamespace(user_id=user, method="cbpo") for user in users])
    prompted = driver._prompt_pass(spec, dataset, history, planned, driver.Progress())
    for (_, bare), (_, items) in zip(planned, prompted):
        assert [e.y for e in items.positives] == [e.y for e in bare.positives]
        assert all(e.x != b.x and e.x.endswith(b.x) for e, b in zip(items.positives[1:], bare.positives[1:])), "each item after the oldest carries retrieved ones"
    values = driver._reference_pass(Workspace.open(tmp_path / "home"), spec, TASK, prompted, None, Resources(), driver.Progress())

    seeded = load_user_context(TASK, dataset, history, tiny_model_dir, None, "cpu", values)
    fresh = load_user_context(TASK, dataset, history, tiny_model_dir, None, "cpu")
    together, alone = personalize_users(seeded, users, config), personalize_users(fresh, users, config)
    assert seeded.reference.computed == 0, "every pair the worker trains on came from the job's pass"
    assert fresh.reference.computed == len(values)
    for a, b in zip(together, alone):
        assert a.metrics["losses"] == pytest.approx(b.metrics["losses"], rel=1e-5, abs=1e-6)
        assert a.predictions == b.predictions
