"""γ estimation of METHOD.md §4 on synthetic PU data (cbpo_orch.method.prior)."""

import numpy as np
import pytest

from cbpo_orch.method.prior import PriorConfig, PriorEstimate, estimate_gamma

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


def test_tiny_profile_uses_fallback_with_reason():
    pos, aux = pu_user(0.3)
    est = estimate_gamma(pos[:6], aux, PriorConfig(fallback_gamma=0.35))
    assert est == PriorEstimate(
        gamma=0.35, c=None, estimator="elkan-noto", n_pos=6, n_aux=300, reason=est.reason
    )
    assert est.reason and "6 target" in est.reason
    assert estimate_gamma(pos, aux[:9]).reason is not None


def test_deterministic_given_seed():
    data = pu_user(0.4, seed=5)
    assert estimate_gamma(*data, PriorConfig(seed=7)) == estimate_gamma(*data, PriorConfig(seed=7))


@pytest.mark.parametrize(
    "kwargs",
    [{"estimator": "median"}, {"folds": 1}, {"min_items": 3}, {"gamma_max": 1.0}, {"fallback_gamma": 0.95}],
)
def test_invalid_config_is_rejected(kwargs):
    with pytest.raises(ValueError):
        PriorConfig(**kwargs)
