"""``--aux-resample``: every epoch trains on aux items of its own, drawn at once per user, and
with it off (or one epoch) a user's plan is exactly the one draw's plan."""

from __future__ import annotations

from dataclasses import replace

import pytest

from cbpo_orch.method.config import TrainConfig
from cbpo_orch.training.trainer import Sample, UserTraining, _Plan, epoch_parts
from cbpo_orch.workers.user_items import user_items


def test_epoch_parts_split_in_order_larger_parts_first():
    assert epoch_parts(list(range(7)), 3) == [[0, 1, 2], [3, 4], [5, 6]]
    assert epoch_parts([4, 5], 3) == [[4], [5]]
    assert epoch_parts([], 3) == [[]]
    assert epoch_parts([1, 2, 3], 1) == [[1, 2, 3]]


def test_a_resampling_user_draws_distinct_aux_items_for_every_epoch(sample_history):
    dataset, history = sample_history
    user = next(iter(dataset.users))
    once = user_items(dataset, history, user, TrainConfig(method="cbpo", max_profile=10))
    every = user_items(dataset, history, user, TrainConfig(method="cbpo", max_profile=10, aux_resample=True))
    n = len(once.auxiliary)
    assert n == len(once.positives) == len(once.aux_rows)
    assert len(every.auxiliary) == 3 * n, "cbpo's 3 epochs, aux_ratio × positives each"
    assert len({(e.user_id, e.item_id) for e in every.auxiliary}) == 3 * n, "distinct items: a fresh draw per epoch"
    assert all(e.user_id != user for e in every.auxiliary)
    assert every.aux_rows == history.rows(every.auxiliary[:n]), "γ reads the first epoch's draw"
    sft = user_items(dataset, history, user, TrainConfig(method="sft", max_profile=10, aux_resample=True))
    assert sft.auxiliary == [], "a method without aux draws none"


def _user(n_pos: int, n_aux: int) -> UserTraining:
    samples = [Sample(pair=None, positive=True) for _ in range(n_pos)] + [Sample(pair=None, positive=False) for _ in range(n_aux)]
    return UserTraining(samples=samples, seed=7)


def _epochs(plan: _Plan) -> list[list[int]]:
    epochs, current = [], []
    for batch, ends_epoch in plan.steps:
        current += batch
        if ends_epoch:
            epochs.append(current)
            current = []
    return epochs


@pytest.mark.parametrize("method", ["cbpo", "kto", "bco"])
def test_each_epoch_trains_on_its_own_part_of_the_aux_items(method):
    user, config = _user(6, 18), TrainConfig(method=method, batch_size=4)
    epochs = _epochs(_Plan.of(user, replace(config, aux_resample=True)))
    assert len(epochs) == 3
    for e, seen in enumerate(epochs):
        aux_seen = {i for i in seen if i >= 6}
        assert aux_seen and aux_seen <= set(range(6 + 6 * e, 12 + 6 * e)), (e, sorted(aux_seen))
        assert set(range(6)) <= set(seen), "every positive every epoch"
    fixed = _epochs(_Plan.of(user, config))
    assert {i for i in fixed[2] if i >= 6} - set(range(6, 12)), "without resampling every epoch draws from all aux items"


def test_one_epoch_or_resampling_off_is_the_one_draws_plan():
    user = _user(5, 5)
    one_epoch = TrainConfig(method="cbpo", epochs=1, batch_size=4)
    assert _Plan.of(user, replace(one_epoch, aux_resample=True)).steps == _Plan.of(user, one_epoch).steps


def test_a_resampling_run_trains_on_every_epochs_draw_end_to_end(sample_history, tiny_model_dir):
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.training.models import load_model
    from cbpo_orch.workers.personalize import personalize_user
    from cbpo_orch.workers.user_context import UserContext

    dataset, history = sample_history
    context = UserContext(task=load_task("lamp4"), dataset=dataset, history=history, loaded=load_model(tiny_model_dir, "cpu"))
    config = TrainConfig(method="cbpo", aux_resample=True, max_profile=8, lr=5e-3, max_prompt_tokens=128, max_new_tokens=12)
    metrics = personalize_user(context, next(iter(dataset.users)), config).metrics
    assert metrics["n_pos"] == 8 and metrics["n_aux"] == 24
    assert len(metrics["losses"]) == 3 * 2, "3 epochs of (8 own + 8 aux) / 8 a batch"
