"""Evaluation items: a user's newest k items, at most half of them; and each user's own aux draw."""

import pytest

from cbpo_orch.data.evaluation_items import evaluation_size, split_evaluation
from cbpo_orch.workers.user_items import aux_seed


def test_the_newest_k_items_are_held_for_evaluation():
    items = list(range(20))  # oldest first
    assert split_evaluation(items, 8) == (list(range(12)), list(range(12, 20)))
    assert split_evaluation(items, 0) == (items, [])


def test_at_most_half_of_a_short_history_is_held():
    assert [evaluation_size(n, 8) for n in (0, 1, 2, 5, 6, 15, 16, 17)] == [0, 0, 1, 2, 3, 7, 8, 8]
    assert split_evaluation(list("abcde"), 8) == (list("abc"), list("de"))
    with pytest.raises(ValueError):
        evaluation_size(10, -1)


def test_each_user_draws_its_own_aux_positions_deterministically():
    assert aux_seed("alice", 0) == aux_seed("alice", 0)
    assert len({aux_seed(user, seed) for user in ("alice", "bob") for seed in (0, 1)}) == 4


def test_a_user_too_short_to_estimate_takes_the_median_of_the_jobs_estimated_users():
    from cbpo_orch.workers.user_items import GammaInputs, with_task_level_gamma

    settings = ("elkan-noto", 0.9, 0.5, 0)
    short = "too few items to cross-fit (3 target, 3 auxiliary; need at least 6 each): fallback gamma 0.5"
    short_user, other_settings = GammaInputs((4,), (9,), *settings), GammaInputs((5,), (9,), "paper", 0.9, 0.5, 0)
    gammas = {
        GammaInputs((1,), (9,), *settings): (0.1, None),
        GammaInputs((2,), (9,), *settings): (0.3, None),
        GammaInputs((3,), (9,), *settings): (0.7, None),
        short_user: (0.5, short),
        other_settings: (0.5, short),  # no estimate fitted with its settings: unchanged
    }
    out = with_task_level_gamma(gammas)
    assert out[short_user][0] == 0.3
    assert out[short_user][1] == f"{short}; instead the task-level gamma 0.300, the median of the job's 3 estimated users"
    assert out[other_settings] == (0.5, short)
    assert out[GammaInputs((1,), (9,), *settings)] == (0.1, None)
