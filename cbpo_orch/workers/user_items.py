"""What a user trains on and is evaluated on, before any model touches it: its evaluation
items, its positives, its held-out slice and its aux items (METHOD.md §5), for one method's
config.

Plain data over the dataset and the history index (no torch): the worker calls it before
training a user, and the driver calls it to plan the job's one π_ref pass over the very
pairs its runs will train on, and its one γ pass over the very rows γ is estimated on.
"""

from __future__ import annotations

import hashlib
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from cbpo_orch.data.dataset import Dataset
from cbpo_orch.data.records import Example
from cbpo_orch.data.evaluation_items import split_evaluation
from cbpo_orch.data.history import HistoryIndex
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.method.methods import method_spec
from cbpo_orch.method.selection import split_holdout


@dataclass(frozen=True)
class UserItems:
    """``own_rows``/``aux_rows``: the positives' and the (first epoch's) aux items' rows of the
    history index (γ is estimated on their embeddings); ``auxiliary``: the aux items the method
    trains on, every epoch's part in order with ``aux_resample`` (none for a method without
    aux); ``evaluation``: the newest items, scored like queries by every method and never
    trained on."""

    positives: list[Example]
    held_out: list[Example]
    own_rows: list[int]
    aux_rows: list[int]
    auxiliary: list[Example]
    evaluation: list[Example]


def user_items(dataset: Dataset, history: HistoryIndex, user_id: str, config: TrainConfig) -> UserItems:
    """Set aside the user's newest ``eval_items`` items for evaluation, hold out the most
    recent of the rest (when the method trains and selection is on), then draw
    ``aux_ratio`` × positives rows of other users' items by ``aux_strategy`` (that many per
    epoch with ``aux_resample``, in one draw of distinct rows where the pool holds them), the
    draw seeded by the user and the seed (``aux_seed``)."""
    method = method_spec(config.method)
    items, evaluation = split_evaluation(dataset.examples(user_id, config.max_profile), config.eval_items)
    selects = config.selection and method.trains
    positives, held_out = split_holdout(items, config.selection_min_items) if selects else (items, [])
    own_rows = history.rows(positives)
    n_aux = max(1, round(config.aux_ratio * len(positives)))
    draws = config.resolved_epochs if config.aux_resample and method.uses_aux else 1
    drawn = history.auxiliary(user_id, own_rows, n_aux * draws, config.aux_strategy, aux_seed(user_id, config.seed))
    auxiliary = [history.examples[row] for row in drawn] if method.uses_aux else []
    return UserItems(positives, held_out, own_rows, drawn[:n_aux], auxiliary, evaluation)


def prompt_kind(config: TrainConfig) -> str:
    """How ``config``'s method composes its prompts (``prompts.py``): its MethodSpec prompt kind, or
    retrieved items for an arm that trains with ``--retrieve k`` (``base`` stays the plain baseline)."""
    method = method_spec(config.method)
    return "retrieved" if method.trains and config.retrieve else method.prompt


def aux_seed(user_id: str, seed: int) -> int:
    """The seed of a user's aux draw: its own per (user, seed), so that users do not all draw
    the same positions of the pool."""
    return int.from_bytes(hashlib.blake2b(f"{user_id}\0{seed}".encode(), digest_size=8).digest(), "little")


def trained_pairs(items: Iterable[UserItems]) -> list[tuple[str, str]]:
    """The distinct (x, y) pairs that users train on (positives and aux), first seen first."""
    return list(dict.fromkeys((e.x, e.y) for user in items for e in (*user.positives, *user.auxiliary)))


class GammaInputs(NamedTuple):
    """All an estimated γ depends on: the rows of the user's positives and aux items, and the
    estimator's settings."""

    own_rows: tuple[int, ...]
    aux_rows: tuple[int, ...]
    estimator: str
    gamma_max: float
    fallback_gamma: float
    seed: int

    @property
    def settings(self) -> tuple[str, float, float, int]:
        return self.estimator, self.gamma_max, self.fallback_gamma, self.seed


def gamma_inputs(items: UserItems, config: TrainConfig) -> GammaInputs | None:
    """What the user's estimated γ depends on (METHOD.md §4: the embeddings of its positives
    and aux items, and the estimator's settings), so that runs with equal inputs share one
    estimate; None where γ is not estimated (a method without γ, or γ fixed by the config)."""
    if not method_spec(config.method).uses_gamma or config.gamma is not None:
        return None
    return GammaInputs(tuple(items.own_rows), tuple(items.aux_rows), config.gamma_estimator, config.gamma_max, config.fallback_gamma, config.seed)


def with_task_level_gamma(gammas: dict[GammaInputs, tuple[float, str | None]]) -> dict[GammaInputs, tuple[float, str | None]]:
    """``gammas`` (γ and, for a fallback, why) with every fallback replaced by the median of
    the fitted estimates made with the same estimator settings, its reason saying so: a user
    too short to cross-fit belongs to the job's task, not to the constant. Unchanged where no
    estimate with those settings was fitted."""
    fitted: dict[tuple, list[float]] = defaultdict(list)
    for inputs, (gamma, reason) in gammas.items():
        if reason is None:
            fitted[inputs.settings].append(gamma)
    out = {}
    for inputs, (gamma, reason) in gammas.items():
        found = fitted.get(inputs.settings)
        if reason is not None and found:
            gamma = statistics.median(found)
            reason = f"{reason}; instead the task-level gamma {gamma:.3f}, the median of the job's {len(found)} estimated users"
        out[inputs] = (gamma, reason)
    return out
