"""Losses of METHOD.md §3 against hand-computed values (cbpo_orch.method.objectives)."""

import math

import pytest
import torch

from cbpo_orch.method.objectives import (
    bco_loss,
    cbpo_loss,
    kto_loss,
    negative_loss,
    per_user_mean,
    positive_loss,
    sft_loss,
)


def l_pos(r, delta):
    """ℓ₊ by hand: −log σ(r − δ) = log(1 + e^{−(r−δ)})."""
    return math.log(1.0 + math.exp(-(r - delta)))


def l_neg(r, delta):
    """ℓ₋ by hand: −log σ(−(r − δ)) = log(1 + e^{r−δ})."""
    return math.log(1.0 + math.exp(r - delta))


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def batch(rewards, positive, user=None):
    r = torch.tensor(rewards, dtype=torch.float64, requires_grad=True)
    p = torch.tensor(positive)
    u = torch.zeros(len(rewards), dtype=torch.long) if user is None else torch.tensor(user)
    return r, p, u


def test_every_trained_method_names_an_objective_and_a_known_cbpo_variant():
    from cbpo_orch.method.methods import METHODS
    from cbpo_orch.method.objectives import CBPO_VARIANTS

    objectives = {name: (m.objective, m.cbpo_variant if m.objective == "cbpo" else None) for name, m in METHODS.items() if m.trains}
    assert objectives == {
        "sft": ("sft", None), "sft-aux": ("sft", None), "kto": ("kto", None), "bco": ("bco", None),
        "cbpo": ("cbpo", "nonneg"), "cbpo-raw": ("cbpo", "raw"), "cbpo-nnpu": ("cbpo", "nnpu"),
    }
    assert {m.cbpo_variant for m in METHODS.values()} <= set(CBPO_VARIANTS)
    assert [n for n, m in METHODS.items() if m.uses_reference] == ["kto", "bco", "cbpo", "cbpo-raw", "cbpo-nnpu"]
    assert [n for n, m in METHODS.items() if m.mismatched] == ["kto"] and METHODS["bco"].reference == "joint"


def test_elementwise_losses_match_formulas():
    r = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    got_pos = positive_loss(r, torch.tensor(0.3, dtype=torch.float64))
    got_neg = negative_loss(r, torch.tensor(0.3, dtype=torch.float64))
    assert got_pos.tolist() == pytest.approx([l_pos(x, 0.3) for x in (0.5, -1.0, 2.0)], abs=1e-12)
    assert got_neg.tolist() == pytest.approx([l_neg(x, 0.3) for x in (0.5, -1.0, 2.0)], abs=1e-12)


def test_elementwise_losses_are_stable_for_large_rewards():
    r = torch.tensor([200.0, -200.0])
    assert torch.isfinite(positive_loss(r, torch.tensor(0.0))).all()
    assert negative_loss(r, torch.tensor(0.0)).tolist() == pytest.approx([200.0, 0.0])


def test_per_user_mean_gives_zero_to_users_without_samples():
    values = torch.tensor([1.0, 3.0, float("nan"), 10.0])
    user = torch.tensor([0, 0, 2, 2])
    mask = torch.tensor([True, True, False, True])
    assert per_user_mean(values, user, mask, 3).tolist() == [2.0, 0.0, 10.0]


def test_sft_is_token_mean_nll_over_included_samples():
    logp = torch.tensor([-4.0, -6.0, -3.0, -8.0])
    n_tok = torch.tensor([2, 3, 1, 4])
    user = torch.tensor([0, 0, 0, 1])
    positive = torch.tensor([True, True, False, True])
    sft = sft_loss(logp, n_tok, positive, user, 2)
    sft_aux = sft_loss(logp, n_tok, torch.ones(4, dtype=torch.bool), user, 2)
    assert sft.tolist() == pytest.approx([(4 + 6) / (2 + 3), 8 / 4])
    assert sft_aux.tolist() == pytest.approx([(4 + 6 + 3) / (2 + 3 + 1), 8 / 4])


def test_bco_matches_formula():
    r, p, u = batch([1.0, 0.2, -0.5, -1.5], [True, True, False, False])
    got = bco_loss(r, p, u, [0.1], 1)
    want = (l_pos(1.0, 0.1) + l_pos(0.2, 0.1)) / 2 + (l_neg(-0.5, 0.1) + l_neg(-1.5, 0.1)) / 2
    assert got.shape == (1,)
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_kto_matches_formula_and_averages_over_all_samples():
    r, p, u = batch([1.0, 0.2, -0.5], [True, True, False])
    got = kto_loss(r, p, u, [0.2], 1, lambda_d=1.5, lambda_u=0.5)
    want = (1.5 * (1 - sig(1.0 - 0.2)) + 1.5 * (1 - sig(0.0)) + 0.5 * (1 - sig(0.2 + 0.5))) / 3
    assert got.item() == pytest.approx(want, abs=1e-12)


def test_cbpo_raw_matches_formula():
    r, p, u = batch([1.0, 0.5, -0.5, 0.3], [True, True, False, False])
    gamma, delta = 0.4, 0.1
    got = cbpo_loss(r, p, u, [delta], [gamma], 1, variant="raw")
    e_tar_pos = (l_pos(1.0, delta) + l_pos(0.5, delta)) / 2
    e_tar_neg = (l_neg(1.0, delta) + l_neg(0.5, delta)) / 2
    e_aux_neg = (l_neg(-0.5, delta) + l_neg(0.3, delta)) / 2
    assert got.item() == pytest.approx(e_tar_pos + (e_aux_neg - gamma * e_tar_neg) / (1 - gamma), abs=1e-12)


@pytest.mark.parametrize("variant", ["raw", "nonneg", "nnpu"])
def test_cbpo_with_zero_gamma_is_exactly_bco(variant):
    r, p, u = batch([1.3, -0.2, 0.4, -2.0, 0.7], [True, True, False, False, False], [0, 1, 0, 1, 1])
    delta = torch.tensor([0.05, -0.3])
    cbpo = cbpo_loss(r, p, u, delta, torch.zeros(2), 2, variant=variant)
    assert torch.equal(cbpo, bco_loss(r, p, u, delta, 2))


def test_nonneg_equals_raw_when_bracket_is_positive():
    # aux rewards high (ℓ₋ large), target rewards low (ℓ₋ small): bracket > 0.
    r, p, u = batch([-1.0, -2.0, 1.0, 2.0], [True, True, False, False])
    gamma = 0.5
    bracket = (l_neg(1.0, 0) + l_neg(2.0, 0)) / 2 - gamma * (l_neg(-1.0, 0) + l_neg(-2.0, 0)) / 2
    assert bracket > 0
    raw = cbpo_loss(r, p, u, torch.zeros(1), torch.tensor([gamma]), 1, variant="raw")
    nonneg = cbpo_loss(r, p, u, torch.zeros(1), torch.tensor([gamma]), 1)
    want = (l_pos(-1.0, 0) + l_pos(-2.0, 0)) / 2 + bracket / (1 - gamma)
    assert nonneg.item() == pytest.approx(want, abs=1e-12)
    assert nonneg.item() == pytest.approx(raw.item(), abs=1e-12)


NEG_BRACKET = ([2.0, 1.0, -1.0, -2.0], [True, True, False, False])
NEG_GAMMA = 0.5


def neg_bracket_by_hand():
    e_tar_neg = (l_neg(2.0, 0) + l_neg(1.0, 0)) / 2
    e_aux_neg = (l_neg(-1.0, 0) + l_neg(-2.0, 0)) / 2
    return e_aux_neg - NEG_GAMMA * e_tar_neg


def test_nonneg_clamps_a_negative_bracket_and_blocks_its_gradient():
    bracket = neg_bracket_by_hand()
    assert bracket < 0
    r, p, u = batch(*NEG_BRACKET)
    loss = cbpo_loss(r, p, u, torch.zeros(1), torch.tensor([NEG_GAMMA]), 1)
    assert loss.item() == pytest.approx((l_pos(2.0, 0) + l_pos(1.0, 0)) / 2, abs=1e-12)
    raw = cbpo_loss(r, p, u, torch.zeros(1), torch.tensor([NEG_GAMMA]), 1, variant="raw")
    assert raw.item() < loss.item()
    loss.sum().backward()
    # aux samples enter only through the bracket; target samples only through E_tar[ℓ₊]:
    # d/dr ℓ₊(r) = −(1 − σ(r)), averaged over the 2 target samples.
    assert r.grad.tolist() == pytest.approx(
        [-(1 - sig(2.0)) / 2, -(1 - sig(1.0)) / 2, 0.0, 0.0], abs=1e-12
    )


def test_nnpu_ascends_on_a_negative_bracket():
    bracket = neg_bracket_by_hand()
    r, p, u = batch(*NEG_BRACKET)
    loss = cbpo_loss(r, p, u, torch.zeros(1), torch.tensor([NEG_GAMMA]), 1, variant="nnpu")
    assert loss.item() == pytest.approx(-bracket / (1 - NEG_GAMMA), abs=1e-12)
    loss.sum().backward()
    # The positive term is dropped: the target samples' gradient comes from −B alone,
    # d(−B)/dr_tar = γ·σ(r)/2 / (1−γ); the aux samples' is −σ(r)/2 / (1−γ).
    scale = 1 / (1 - NEG_GAMMA)
    assert r.grad.tolist() == pytest.approx(
        [
            scale * NEG_GAMMA * sig(2.0) / 2,
            scale * NEG_GAMMA * sig(1.0) / 2,
            -scale * sig(-1.0) / 2,
            -scale * sig(-2.0) / 2,
        ],
        abs=1e-12,
    )
    stepped = (r - 0.1 * r.grad).tolist()
    bracket_after = (l_neg(stepped[2], 0) + l_neg(stepped[3], 0)) / 2 - NEG_GAMMA * (
        l_neg(stepped[0], 0) + l_neg(stepped[1], 0)
    ) / 2
    assert bracket_after > bracket


def test_nnpu_equals_nonneg_when_bracket_is_positive():
    r, p, u = batch([-1.0, -2.0, 1.0, 2.0], [True, True, False, False])
    gamma = torch.tensor([0.5])
    nnpu = cbpo_loss(r, p, u, torch.zeros(1), gamma, 1, variant="nnpu")
    assert torch.equal(nnpu, cbpo_loss(r, p, u, torch.zeros(1), gamma, 1))


def test_unknown_cbpo_variant_is_rejected():
    r, p, u = batch([1.0, -1.0], [True, False])
    with pytest.raises(ValueError):
        cbpo_loss(r, p, u, torch.zeros(1), torch.zeros(1), 1, variant="clipped")


# (rewards, positive, log π_θ(y|x) summed, completion tokens) per sample
USER_A = ([1.0, -0.4, 0.6], [True, False, False], [-3.0, -5.0, -2.0], [2, 4, 1])
USER_B = ([2.0, 0.5, -1.0, -3.0], [True, True, False, False], [-1.0, -7.0, -4.0, -6.0], [1, 3, 2, 5])


def all_losses(data, user, delta, gamma, n_users):
    rewards, positive, logp, n_tok = data
    r, p, u = batch(rewards, positive, user)
    logp, n_tok = torch.tensor(logp), torch.tensor(n_tok)
    out = {
        "bco": bco_loss(r, p, u, delta, n_users),
        "kto": kto_loss(r, p, u, delta, n_users, 1.2, 0.7),
        "sft": sft_loss(logp, n_tok, p, u, n_users),
        "sft-aux": sft_loss(logp, n_tok, torch.ones_like(p), u, n_users),
    }
    for variant in ("raw", "nonneg", "nnpu"):
        out[variant] = cbpo_loss(r, p, u, delta, gamma, n_users, variant)
    return out


def test_two_user_batch_gives_each_user_its_own_loss():
    # Interleave the two users' samples in one batch.
    order = [("b", 0), ("a", 0), ("b", 2), ("a", 1), ("b", 1), ("a", 2), ("b", 3)]
    data = {"a": USER_A, "b": USER_B}
    mixed = tuple([data[k][field][i] for k, i in order] for field in range(4))
    user = [0 if k == "a" else 1 for k, _ in order]
    delta = torch.tensor([0.2, -0.3], dtype=torch.float64)
    gamma = torch.tensor([0.3, 0.6], dtype=torch.float64)
    joint = all_losses(mixed, user, delta, gamma, 2)
    for idx, key in ((0, "a"), (1, "b")):
        alone = all_losses(data[key], None, delta[idx : idx + 1], gamma[idx : idx + 1], 1)
        for name, value in alone.items():
            assert joint[name][idx].item() == pytest.approx(value.item(), abs=1e-12), (key, name)


def test_two_user_gradients_are_isolated():
    r, p, u = batch([1.0, -0.4, 2.0, -3.0], [True, False, True, False], [0, 0, 1, 1])
    delta = torch.tensor([0.2, -0.3])
    gamma = torch.tensor([0.3, 0.6])
    loss = cbpo_loss(r, p, u, delta, gamma, 2)
    loss[0].backward()
    assert r.grad[2:].tolist() == [0.0, 0.0]
    assert all(g != 0.0 for g in r.grad[:2].tolist())
