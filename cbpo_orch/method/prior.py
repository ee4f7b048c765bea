"""Per-user correction coefficient γ (the PU class prior) by Elkan–Noto (METHOD.md §4).

A class-balanced logistic regression g tells the target's pairs H_tar (label 1)
from the auxiliary pairs H_aux (label 0) on their sentence embeddings. It is
cross-fitted (stratified K folds), so every item is scored by a model that did not
see it. Then c = mean of g over H_tar (Elkan–Noto's e1) and γ is the mean over
H_aux of

- "elkan-noto" (default): w(x) = ((1−c)/c) · g/(1−g), the probability that an
  unlabeled item is positive;
- "paper": g(x)/c, the paper's formula (it overestimates γ).

Under Elkan–Noto's assumption p(s=1|x) = c · p(y=1|x) ≤ c, so w(x) ≤ 1 and
w ≤ g/c. A logistic link cannot saturate at c: on target-like aux items its g
runs past c toward 1, and the odds g/(1−g) explode (on synthetic PU data the plain
mean of w lands at 0.6–0.9 for a true γ of 0.2). "elkan-noto" therefore applies
the bound, g ← min(g, c), i.e. w ← min(w, 1), before averaging (ours). "paper" is
kept as written. Class balancing changes only the effective labeled:unlabeled
ratio, not the composition of H_aux, so the estimate stays consistent.

γ is clipped to [0, gamma_max]. Profiles too small to hold out (fewer than
``min_items`` pairs on either side) get ``fallback_gamma`` and a recorded reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

ESTIMATORS = ("elkan-noto", "paper")
_EPS = 1e-6


@dataclass(frozen=True)
class PriorConfig:
    """How γ is estimated (METHOD.md §4); every default is ours.

    estimator: "elkan-noto" (default) or "paper". folds: cross-fitting folds.
    gamma_max: upper clip of γ (§3). min_items: below this many pairs in H_tar or
    H_aux no classifier is fitted and ``fallback_gamma`` is used. C: inverse L2
    regularisation strength of the logistic regression. seed: fold shuffling.
    """

    estimator: str = "elkan-noto"
    folds: int = 5
    gamma_max: float = 0.9
    min_items: int = 10
    fallback_gamma: float = 0.5
    C: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; expected one of {ESTIMATORS}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if self.min_items < self.folds:
            raise ValueError(f"min_items ({self.min_items}) must be >= folds ({self.folds})")
        if not 0.0 <= self.gamma_max < 1.0:
            raise ValueError(f"gamma_max must be in [0, 1), got {self.gamma_max}")
        if not 0.0 <= self.fallback_gamma <= self.gamma_max:
            raise ValueError(f"fallback_gamma must be in [0, gamma_max], got {self.fallback_gamma}")


@dataclass(frozen=True)
class PriorEstimate:
    """γ for one user and how it was obtained.

    c is Elkan–Noto's label frequency (None on fallback); reason is None when the
    classifier was fitted and a human-readable explanation when the fallback was used.
    """

    gamma: float
    c: float | None
    estimator: str
    n_pos: int
    n_aux: int
    reason: str | None = None


def held_out_scores(x: np.ndarray, labels: np.ndarray, config: PriorConfig) -> np.ndarray:
    """Cross-fitted g(x) = P(label 1 | x) of a class-balanced logistic regression.

    Each item is scored by the model fitted on the other folds; scores are clipped to
    [1e-6, 1 − 1e-6].
    """
    scores = np.empty(len(labels), dtype=np.float64)
    folds = StratifiedKFold(n_splits=config.folds, shuffle=True, random_state=config.seed)
    for train, test in folds.split(x, labels):
        model = LogisticRegression(class_weight="balanced", C=config.C, max_iter=1000)
        model.fit(x[train], labels[train])
        scores[test] = model.predict_proba(x[test])[:, 1]
    return np.clip(scores, _EPS, 1.0 - _EPS)


def gamma_from_scores(g_pos: np.ndarray, g_aux: np.ndarray, estimator: str) -> tuple[float, float]:
    """(γ before clipping, c) from held-out scores of H_tar and H_aux items (see module doc)."""
    c = float(np.clip(g_pos.mean(), _EPS, 1.0 - _EPS))
    if estimator == "paper":
        return float(np.mean(g_aux / c)), c
    g = np.minimum(g_aux, c)
    return float(np.mean((1.0 - c) / c * g / (1.0 - g))), c


def estimate_gamma(
    pos_emb: np.ndarray, aux_emb: np.ndarray, config: PriorConfig = PriorConfig()
) -> PriorEstimate:
    """Estimate γ for one user from embeddings of H_tar [n_pos, D] and H_aux [n_aux, D].

    Deterministic given ``config.seed``.
    """
    n_pos, n_aux = len(pos_emb), len(aux_emb)
    if min(n_pos, n_aux) < config.min_items:
        return PriorEstimate(
            gamma=config.fallback_gamma,
            c=None,
            estimator=config.estimator,
            n_pos=n_pos,
            n_aux=n_aux,
            reason=(
                f"too few items to cross-fit ({n_pos} target, {n_aux} auxiliary; "
                f"need at least {config.min_items} each): fallback gamma {config.fallback_gamma}"
            ),
        )
    x = np.vstack([pos_emb, aux_emb]).astype(np.float64)
    labels = np.concatenate([np.ones(n_pos, dtype=np.int64), np.zeros(n_aux, dtype=np.int64)])
    g = held_out_scores(x, labels, config)
    gamma, c = gamma_from_scores(g[:n_pos], g[n_pos:], config.estimator)
    return PriorEstimate(
        gamma=float(np.clip(gamma, 0.0, config.gamma_max)),
        c=c,
        estimator=config.estimator,
        n_pos=n_pos,
        n_aux=n_aux,
    )
