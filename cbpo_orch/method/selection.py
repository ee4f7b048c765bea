"""Do no harm (ours; not in the paper; off by default): per-user epoch selection on the user's
own history.

The user's most recent profile items, never a query, are held out as a time-ordered
validation slice: the starting model (epoch 0) and the adapter after every epoch are
scored on it, and the best is kept. A later epoch must beat every earlier one strictly,
so when none beats the starting model the user gets the starting model back (a LoRA at
its initialisation: B = 0). Users with fewer than ``min_items`` items keep every item
for training and are not selected.

The score is the held-out items' mean log-probability per completion token: how likely
the model finds the user's own unseen texts, which is what personalizing means. It costs
one forward pass. ROUGE of greedy outputs on 2–8 items was tried first: it moves in
jumps when one output changes a word, so it mostly kept the starting model or picked an
epoch by chance, and generating was most of a user's run time (docs/benchmarks.md).

The log-probability is SFT's own objective, not a method-neutral score: SFT raises it every
epoch, a preference method lowers it on purpose (it pushes shared text down). It kept SFT's
last epoch for every user and C-BPO's early ones, so selection is opt-in (``--selection``).
"""

from __future__ import annotations

import math
from typing import TypeVar

MAX_HOLDOUT = 8
T = TypeVar("T")


def holdout_size(n_items: int, min_items: int) -> int:
    """Items held out of ``n_items``: none below ``min_items``; else a fifth, 2 to 8."""
    if n_items < min_items:
        return 0
    return min(MAX_HOLDOUT, max(2, math.ceil(n_items / 5)))


def split_holdout(items: list[T], min_items: int) -> tuple[list[T], list[T]]:
    """(training items, held-out items) of a user's items in time order, oldest first:
    the held-out items are the most recent ones."""
    k = holdout_size(len(items), min_items)
    return (items[:-k], items[-k:]) if k else (list(items), [])


def best_epoch(scores: list[float]) -> int:
    """Index of the best of ``scores`` (index 0 = the starting model); ties go to the earliest."""
    if not scores:
        raise ValueError("best_epoch needs at least one score")
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
