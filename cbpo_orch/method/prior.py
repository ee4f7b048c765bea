"""Per-user correction coefficient γ (the PU class prior) by Elkan–Noto (METHOD.md §4).

A class-balanced L2 logistic regression g tells the target's pairs H_tar (label 1)
from the auxiliary pairs H_aux (label 0) on their sentence embeddings. It is
cross-fitted over K stratified folds, K = min(``folds``, smaller side), so every item
is scored by a model that did not see it (§4 step 2). Then c = mean of g over H_tar
(Elkan–Noto's e1, step 3) and γ is the mean over H_aux of

- "elkan-noto" (default): w(x) = ((1−c)/c) · g/(1−g), the probability that an
  unlabeled item is positive (step 4), with g ← min(g, c) first (ours, below);
- "paper": g(x)/c, the paper's formula (it overestimates γ), as written.

Calibration of g (ours). Elkan–Noto needs g to be the posterior p(s=1|x). With a fixed
regularisation g is pulled toward ½ instead — on 384-d unit-norm embeddings C = 1 gives
γ ≈ 0.4–0.5 at 12 items a side where the truth is 0 — so γ measured the penalty, not the
overlap. C is therefore chosen inside each outer training fold by an inner stratified
K-fold CV over ``C_GRID`` (10⁻² … 10⁴, one per decade): the C with the least
class-balanced log-loss −½(mean log g over label 1 + mean log(1−g) over label 0), the
proper score of the balanced objective, summed over inner folds (ties: the smaller C),
then refitted on the outer training fold. The outer test fold takes no part in it, so
every score stays held out. ``PriorConfig.C`` fixes C instead (C = 1 with min_items =
10 is the estimator before this calibration). What remains: a classifier that cannot
tell the sides apart (few items, alike users) still reads as overlap, so at small n γ
errs upward.

The clamp g ≤ c (ours, departs from §4's w = ((1−c)/c)·g/(1−g)). Under Elkan–Noto's
assumption p(s=1|x) = c · p(y=1|x) ≤ c, so w(x) ≤ 1. A logistic link cannot saturate
at c: on target-like aux items its g runs past c toward 1 and g/(1−g) explodes, so
"elkan-noto" averages w(min(g, c)) = min(w, 1) (with noisy g this errs slightly low on
target-like items). Class balancing changes only the effective labeled:unlabeled ratio,
not the composition of H_aux, so the estimate stays consistent.

γ is clipped to [0, gamma_max]. With fewer than ``min_items`` pairs on either side no
classifier is fitted: γ = ``fallback_gamma`` and the reason is recorded. Where a job has
users that could be estimated, such a user takes their median instead (``user_items.with_task_level_gamma``):
a short history belongs to the same task as the others, and the constant ½ sat far from the
estimates of the users around it (58 % of Amazon reviewers fell back to it).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import StratifiedKFold

ESTIMATORS = ("elkan-noto", "paper")
C_GRID = tuple(10.0**k for k in range(-2, 5))
_EPS = 1e-6


@dataclass(frozen=True)
class PriorConfig:
    """How γ is estimated (METHOD.md §4); every default is ours.

    estimator: "elkan-noto" (default) or "paper". folds: most cross-fitting folds
    (outer and inner; fewer when a side has fewer items). gamma_max: upper clip of γ
    (§3). min_items: below this many pairs in H_tar or H_aux no classifier is fitted and
    ``fallback_gamma`` is used; from 6 a side γ̂ is closer to the truth than the fallback
    even for weakly distinct users, at 4–5 not clearly (tests/test_prior.py). C: inverse
    L2 regularisation strength of the logistic regression; None chooses it by nested
    cross-validation. seed: fold shuffling.
    """

    estimator: str = "elkan-noto"
    folds: int = 5
    gamma_max: float = 0.9
    min_items: int = 6
    fallback_gamma: float = 0.5
    C: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown estimator {self.estimator!r}; expected one of {ESTIMATORS}")
        if self.folds < 2:
            raise ValueError(f"folds must be >= 2, got {self.folds}")
        if self.min_items < 3:
            raise ValueError(f"min_items must be >= 3 (nested 2-fold cross-fitting), got {self.min_items}")
        if self.C is not None and not self.C > 0:
            raise ValueError(f"C must be > 0 or None (chosen by cross-validation), got {self.C}")
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


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> StratifiedKFold:
    """Shuffled stratified K-fold, K = min(folds, size of the smaller class)."""
    k = min(folds, int(np.bincount(labels, minlength=2).min()))
    return StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)


def balanced_log_loss(labels: np.ndarray, scores: np.ndarray) -> float:
    """Log-loss of P(label 1) ``scores`` with both classes weighted equally."""
    p = np.clip(scores, _EPS, 1.0 - _EPS)
    return float(-0.5 * (np.log(p[labels == 1]).mean() + np.log1p(-p[labels == 0]).mean()))


def _neg_balanced_log_loss(model: LogisticRegression, x: np.ndarray, labels: np.ndarray) -> float:
    return -balanced_log_loss(labels, model.predict_proba(x)[:, 1])


def _fitted_classifier(x: np.ndarray, labels: np.ndarray, config: PriorConfig) -> LogisticRegression:
    """Class-balanced L2 logistic regression with C = ``config.C``, or the C of ``C_GRID``
    of least balanced log-loss over inner stratified folds of (x, labels), refitted."""
    if config.C is not None:
        return LogisticRegression(class_weight="balanced", C=config.C, max_iter=1000).fit(x, labels)
    model = LogisticRegressionCV(
        Cs=list(C_GRID),
        cv=stratified_folds(labels, config.folds, config.seed),
        scoring=_neg_balanced_log_loss,
        class_weight="balanced",
        max_iter=1000,
    )
    with warnings.catch_warnings():
        # scikit-learn 1.8-1.9 announce new defaults (l1_ratios, fitted attribute
        # layout) that leave an L2 fit and predict_proba unchanged.
        warnings.simplefilter("ignore", FutureWarning)
        return model.fit(x, labels)


def held_out_scores(x: np.ndarray, labels: np.ndarray, config: PriorConfig) -> np.ndarray:
    """Cross-fitted g(x) = P(label 1 | x) of a class-balanced logistic regression.

    Each item is scored by the model fitted on the other folds (C chosen inside those
    folds unless fixed); scores are clipped to [1e-6, 1 − 1e-6].
    """
    scores = np.empty(len(labels), dtype=np.float64)
    for train, test in stratified_folds(labels, config.folds, config.seed).split(x, labels):
        model = _fitted_classifier(x[train], labels[train], config)
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
