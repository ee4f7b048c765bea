"""The job's one γ pass: it estimates γ from exactly the inputs a worker's C-BPO run would
(the rows of its positives and aux items, and the estimator's settings), once per distinct
input, so a worker that starts from it estimates none and trains as it would alone."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cbpo_orch.data.tasks import load_task
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.workers import personalize
from cbpo_orch.workers.gamma_pass import estimated_gamma, gamma_shard
from cbpo_orch.workers.personalize import personalize_users
from cbpo_orch.workers.user_context import load_user_context
from cbpo_orch.workers.user_items import gamma_inputs, user_items

TASK = load_task("lamp4")


def test_only_an_estimated_gamma_has_inputs_and_cbpos_variants_share_them(sample_history):
    dataset, history = sample_history
    user = list(dataset.users)[0]
    config = TrainConfig(method="cbpo", max_profile=12)

    def inputs(**changes):
        changed = replace(config, **changes)
        return gamma_inputs(user_items(dataset, history, user, changed), changed)

    assert inputs() == inputs(method="cbpo-raw") == inputs(method="cbpo-nnpu"), "the same draws: one estimate serves all three"
    assert all(inputs(method=m) is None for m in ("base", "sft", "sft-aux", "kto", "bco")), "no γ read"
    assert inputs(gamma=0.3) is None, "a fixed γ is not estimated"
    assert inputs(seed=1) != inputs() != inputs(gamma_estimator="paper") and inputs(gamma_max=0.5) != inputs()
    own, aux, *_ = inputs()
    planned = user_items(dataset, history, user, config)
    assert list(own) == planned.own_rows and list(aux) == planned.aux_rows


def test_a_worker_started_from_the_jobs_gamma_pass_estimates_none_and_trains_the_same(tiny_model_dir, sample_history, monkeypatch):
    dataset, history = sample_history
    config = TrainConfig(method="cbpo", lr=5e-3, epochs=1, batch_size=8, max_profile=12, max_prompt_tokens=128, max_new_tokens=8)
    users = list(dataset.users)[:2]
    keys = [gamma_inputs(user_items(dataset, history, user, config), config) for user in users]
    gammas = {**gamma_shard(keys[:1], history, 1), **gamma_shard(keys[1:], history, 1)}
    assert gammas == {key: estimated_gamma(history, key) for key in keys}

    fresh = personalize_users(load_user_context(TASK, dataset, history, tiny_model_dir, None, "cpu"), users, config)
    monkeypatch.setattr(personalize, "estimated_gamma", lambda *args: pytest.fail("the pass's γ must be used"))
    seeded = personalize_users(load_user_context(TASK, dataset, history, tiny_model_dir, None, "cpu", gammas=gammas), users, config)
    for a, b, key in zip(seeded, fresh, keys):
        assert (a.metrics["gamma"], a.metrics["gamma_reason"]) == (b.metrics["gamma"], b.metrics["gamma_reason"]) == gammas[key]
        assert a.metrics["losses"] == pytest.approx(b.metrics["losses"], rel=1e-5, abs=1e-6)
        assert a.predictions == b.predictions
