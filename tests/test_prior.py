"""γ estimation of METHOD.md §4 on synthetic PU data (cbpo_orch.method.prior)."""

import numpy as np
import pytest

from cbpo_orch.method.prior import PriorConfig, PriorEstimate, balanced_log_loss, estimate_gamma

UNCALIBRATED = PriorConfig(C=1.0, min_items=10)  # the estimator before C was cross-validated

# --- low-dimensional Gaussian users, 300 items a side -------------------------------

DIM = 8
SEPARATION = 1.5  # class means at ±1.5 on one axis: 3σ apart


def pu_user(pi, n_pos=300, n_aux=300, seed=0):
    """Positives N(+μ, I); aux = round(π·n_aux) draws of N(+μ, I) and the rest N(−μ, I)."""
    rng = np.random.default_rng(seed)
    mu = np.zeros(DIM)
    mu[0] = SEPARATION
    n_like = round(pi * n_aux)
    pos = rng.normal(size=(n_pos, DIM)) + mu
    aux = np.vstack([rng.normal(size=(n_like, DIM)) + mu, rng.normal(size=(n_aux - n_like, DIM)) - mu])
    return pos.astype(np.float32), aux.astype(np.float32)


@pytest.mark.parametrize("pi", [0.2, 0.6])
@pytest.mark.parametrize("n_pos,n_aux", [(300, 300), (200, 300)])
def test_elkan_noto_recovers_the_mixing_proportion(pi, n_pos, n_aux):
    est = estimate_gamma(*pu_user(pi, n_pos, n_aux))
    assert est.reason is None and est.c is not None
    assert est.estimator == "elkan-noto"
    assert (est.n_pos, est.n_aux) == (n_pos, n_aux)
    assert est.gamma == pytest.approx(pi, abs=0.1)


def test_overlapping_user_gets_higher_gamma_than_separated_user():
    overlapping = estimate_gamma(*pu_user(0.8, seed=1))
    separated = estimate_gamma(*pu_user(0.1, seed=2))
    assert overlapping.gamma > separated.gamma + 0.3


@pytest.mark.parametrize("pi", [0.1, 0.4, 0.7])
def test_paper_estimator_is_at_least_elkan_noto(pi):
    data = pu_user(pi, seed=3)
    paper = estimate_gamma(*data, PriorConfig(estimator="paper", gamma_max=0.99))
    elkan = estimate_gamma(*data, PriorConfig(gamma_max=0.99))
    assert paper.c == elkan.c
    assert paper.gamma >= elkan.gamma
    assert paper.gamma > elkan.gamma + 0.05  # strictly larger on overlapping data


def test_gamma_is_clipped_to_gamma_max():
    rng = np.random.default_rng(4)
    same = rng.normal(size=(200, DIM)), rng.normal(size=(200, DIM))  # aux all target-like
    est = estimate_gamma(*same, PriorConfig(gamma_max=0.6))
    assert est.gamma == 0.6


# --- 384-d unit-norm users, as sentence embeddings are --------------------------------

EMBED_DIM = 384
SHARED, OWN = 0.15, 0.2  # variance shares of the task and the user direction


def sphere_user(gamma, n, seed=0, own=OWN):
    """n positives and n aux items of one user, unit-norm in 384-d, and the true γ.

    An item is normalise(√SHARED·t + √own·u + √(1 − SHARED − own)·z): t is the task's
    direction (every user), u its owner's direction, z a fresh random unit vector; random
    unit vectors in 384-d are nearly orthogonal, so the cosine of two items is ≈ SHARED +
    own within a user (0.35) and ≈ SHARED across users (0.15). all-MiniLM-L6-v2 pairs of
    our data sets: within 0.21–0.42, across 0.17–0.36; real users differ less (by
    0.04–0.08), which own = 0.06 mimics below. All directions are random, so no
    coordinate stands out. Positives are the user's; aux = round(γ·n) target-like items
    (same u) and the rest from other users (one fresh u each). True γ = round(γ·n) / n.
    """
    rng = np.random.default_rng(seed)

    def unit(v):
        return v / np.linalg.norm(v, axis=-1, keepdims=True)

    def items(owner, k):
        noise = unit(rng.normal(size=(k, EMBED_DIM)))
        return unit(np.sqrt(SHARED) * task + np.sqrt(own) * owner + np.sqrt(1 - SHARED - own) * noise)

    task, user = unit(rng.normal(size=(2, EMBED_DIM)))
    n_like = round(gamma * n)
    others = unit(rng.normal(size=(n - n_like, EMBED_DIM)))
    aux = np.vstack([items(user, n_like), items(others, n - n_like)])
    return items(user, n).astype(np.float32), aux.astype(np.float32), n_like / n


def test_sphere_users_have_real_embedding_cosines():
    pos, aux, _ = sphere_user(0.0, 300)
    within = (pos @ pos.T)[np.triu_indices(300, 1)].mean()
    across = (pos @ aux.T).mean()
    assert np.allclose(np.linalg.norm(pos, axis=1), 1.0, atol=1e-5)
    assert within == pytest.approx(SHARED + OWN, abs=0.02)
    assert across == pytest.approx(SHARED, abs=0.02)


# Tolerances that ≥ 95% of random users meet (48 draws a cell, 8 at n = 300): the largest
# error is 0.005 at γ = 0; 0.08 / 0.23 at n = 32 (γ = 0.3 / 0.6; 92% within 0.15); 0.07 at
# n = 300. At n = 12 one item is 1/12 = 0.083 of γ: for γ = 0.3 the error has sd 0.09 and
# bias +0.06 (90% within 0.15, 98% within 0.25); γ = 0.6 is tested on a mean below.
@pytest.mark.parametrize(
    "n,gamma,tolerance",
    [(12, 0.0, 0.05), (32, 0.0, 0.05), (300, 0.0, 0.05), (12, 0.3, 0.25), (32, 0.3, 0.1), (32, 0.6, 0.2),
     (300, 0.3, 0.1), (300, 0.6, 0.1)],
)
def test_recovers_gamma_on_unit_sphere_embeddings(n, gamma, tolerance):
    pos, aux, truth = sphere_user(gamma, n, seed=n)
    est = estimate_gamma(pos, aux)
    assert est.reason is None
    assert est.gamma == pytest.approx(truth, abs=tolerance)


def test_twelve_items_with_high_overlap_err_upward_but_little_on_average():
    """At n = 12, γ = 0.6 only 5 aux items differ from the target, ≈ 4 per training fold:
    the classifier is weak and Elkan–Noto reads its doubt as overlap. Per user γ̂ spreads
    from 0.31 to the 0.9 cap (sd 0.15, 48 draws); the bias is +0.08, so the mean of 8
    users is within 0.2 of the truth."""
    estimates, truths = [], []
    for seed in range(8):
        pos, aux, truth = sphere_user(0.6, 12, seed=seed)
        estimates.append(estimate_gamma(pos, aux).gamma)
        truths.append(truth)
    assert np.mean(estimates) == pytest.approx(np.mean(truths), abs=0.2)
    assert min(estimates) > 0.25  # none reads as a unique user


@pytest.mark.parametrize("own,n", [(OWN, 12), (0.06, 32)])
def test_unique_user_is_no_longer_read_as_overlapping(own, n):
    """γ = 0, held-out accuracy 1.0 (own 0.2, n = 12) and 0.95 (own 0.06 as in HuffPost:
    within-user cosine 0.21 against 0.15 across, n = 32). C = 1 took its penalty for overlap."""
    pos, aux, _ = sphere_user(0.0, n, seed=2, own=own)
    assert estimate_gamma(pos, aux, UNCALIBRATED).gamma > 0.3
    assert estimate_gamma(pos, aux).gamma < 0.1


def test_rescaling_the_embeddings_leaves_gamma_unchanged():
    """Scaling x by √10 is the same fit as C × 10: it moves γ at a fixed C, not once C is
    chosen by cross-validation over decades."""
    pos, aux, _ = sphere_user(0.3, 32, seed=5)
    scaled = np.sqrt(10.0).astype(np.float32)
    fixed = [estimate_gamma(pos * s, aux * s, UNCALIBRATED).gamma for s in (1, scaled)]
    chosen = [estimate_gamma(pos * s, aux * s).gamma for s in (1, scaled)]
    assert abs(fixed[0] - fixed[1]) > 0.1
    assert chosen[0] == pytest.approx(chosen[1], abs=0.02)


@pytest.mark.parametrize("own,unique_max", [(0.1, 0.5), (OWN, 0.1)])
def test_smallest_estimated_profile_beats_the_fallback(own, unique_max):
    """At ``min_items`` pairs a side γ̂ is closer to the truth than ``fallback_gamma`` over
    γ ∈ {0, 0.3, 0.6} (root-mean-square, 4 users each; over 24 draws 0.17 against 0.32 at
    own 0.2, 0.26 against 0.32 at own 0.1, i.e. within-user cosine 0.25), and unique users
    (γ = 0) get less than ``unique_max``. At 5 a side own 0.1 gives 0.27 against 0.30, at 4
    worse than the fallback."""
    config = PriorConfig()
    errors, fallback_errors = [], []
    for gamma in (0.0, 0.3, 0.6):
        for seed in range(4):
            pos, aux, truth = sphere_user(gamma, config.min_items, seed, own)
            est = estimate_gamma(pos, aux, config)
            assert est.reason is None
            assert gamma > 0 or est.gamma < unique_max
            errors.append(est.gamma - truth)
            fallback_errors.append(config.fallback_gamma - truth)
    assert np.sqrt(np.mean(np.square(errors))) < np.sqrt(np.mean(np.square(fallback_errors)))


def test_balanced_log_loss_weights_classes_equally():
    labels = np.array([1, 1, 1, 0])
    assert balanced_log_loss(labels, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(np.log(2))
    assert balanced_log_loss(labels, np.array([0.9, 0.9, 0.9, 0.1])) == pytest.approx(-np.log(0.9))
    assert balanced_log_loss(labels, np.array([1.0, 1.0, 1.0, 0.5])) == pytest.approx(np.log(2) / 2, abs=1e-5)


# --- guards -------------------------------------------------------------------------


def test_tiny_profile_uses_fallback_with_reason():
    pos, aux = pu_user(0.3)
    too_few = PriorConfig().min_items - 1
    est = estimate_gamma(pos[:too_few], aux, PriorConfig(fallback_gamma=0.35))
    assert est == PriorEstimate(
        gamma=0.35, c=None, estimator="elkan-noto", n_pos=too_few, n_aux=300, reason=est.reason
    )
    assert est.reason and f"{too_few} target" in est.reason
    assert estimate_gamma(pos, aux[:too_few]).reason is not None


def test_deterministic_given_seed():
    pos, aux, _ = sphere_user(0.3, 12, seed=6)
    assert estimate_gamma(pos, aux, PriorConfig(seed=7)) == estimate_gamma(pos, aux, PriorConfig(seed=7))


@pytest.mark.parametrize(
    "kwargs",
    [{"estimator": "median"}, {"folds": 1}, {"min_items": 2}, {"C": 0.0}, {"gamma_max": 1.0}, {"fallback_gamma": 0.95}],
)
def test_invalid_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        PriorConfig(**kwargs)
