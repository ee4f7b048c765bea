"""What a user trains on, before any model touches it: its positives, its held-out slice
and its aux items (METHOD.md §5), for one method's config.

Plain data over the dataset and the history index (no torch): the worker calls it before
training a user, and the driver calls it to plan the job's one π_ref pass over the very
pairs its runs will train on, and its one γ pass over the very rows γ is estimated on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from cbpo_orch.data.dataset import Dataset, Example
from cbpo_orch.data.history import HistoryIndex
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.method.methods import method_spec
from cbpo_orch.method.selection import split_holdout


@dataclass(frozen=True)
class UserItems:
    """``own_rows``/``aux_rows``: the positives' and the aux items' rows of the history index
    (γ is estimated on their embeddings); ``auxiliary``: the aux items the method trains on
    (none for a method without aux)."""

    positives: list[Example]
    held_out: list[Example]
    own_rows: list[int]
    aux_rows: list[int]
    auxiliary: list[Example]


def user_items(dataset: Dataset, history: HistoryIndex, user_id: str, config: TrainConfig) -> UserItems:
    """Hold out the user's most recent items (when the method trains and selection is on),
    then draw ``aux_ratio`` × positives rows of other users' items by ``aux_strategy``."""
    spec = method_spec(config.method)
    items = dataset.examples(user_id, config.max_profile)
    selects = config.selection and spec.trains
    positives, held_out = split_holdout(items, config.selection_min_items) if selects else (items, [])
    own_rows = history.rows(positives)
    n_aux = max(1, round(config.aux_ratio * len(positives)))
    aux_rows = history.auxiliary(user_id, own_rows, n_aux, config.aux_strategy, config.seed)
    auxiliary = [history.examples[row] for row in aux_rows] if spec.uses_aux else []
    return UserItems(positives, held_out, own_rows, aux_rows, auxiliary)


def trained_pairs(items: Iterable[UserItems]) -> list[tuple[str, str]]:
    """The distinct (x, y) pairs that users train on (positives and aux), first seen first."""
    return list(dict.fromkeys((e.x, e.y) for user in items for e in (*user.positives, *user.auxiliary)))


GammaInputs = tuple
"""(own rows, aux rows, estimator, gamma_max, fallback_gamma, seed): all an estimated γ depends on."""


def gamma_inputs(items: UserItems, config: TrainConfig) -> GammaInputs | None:
    """What the user's estimated γ depends on (METHOD.md §4: the embeddings of its positives
    and aux items, and the estimator's settings), so that runs with equal inputs share one
    estimate; None where γ is not estimated (a method without γ, or γ fixed by the config)."""
    if not method_spec(config.method).uses_gamma or config.gamma is not None:
        return None
    return (tuple(items.own_rows), tuple(items.aux_rows), config.gamma_estimator, config.gamma_max, config.fallback_gamma, config.seed)
