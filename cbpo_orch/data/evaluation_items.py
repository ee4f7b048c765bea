"""A user's evaluation items: the newest k history items, scored like queries, never trained on.

LaMP-style data holds one or two queries per user. The SD of a user's score difference between
two methods is then 0.04–0.09 ROUGE-1, almost all query noise, and telling a 0.01 difference
(the paper's margins) takes hundreds of users. Scoring each user on its newest k items as well
(a time split: every earlier item may train, no later one does) cuts that noise by about √k.
At most half of a user's items go to evaluation, so that a short history still trains.
"""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def evaluation_size(n_items: int, k: int) -> int:
    """Items of ``n_items`` (oldest first) held for evaluation: ``k``, at most half of them."""
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")
    return min(k, n_items // 2)


def split_evaluation(items: list[T], k: int) -> tuple[list[T], list[T]]:
    """(items that may train, evaluation items) of a user's items in time order, oldest first:
    the evaluation items are the newest ``evaluation_size`` ones."""
    n = evaluation_size(len(items), k)
    return (list(items[: len(items) - n]), list(items[len(items) - n :]))
