"""Reference points δ of METHOD.md §2 and §7 (cbpo_orch.method.reference)."""

import json

import pytest
import torch

from cbpo_orch.method.reference import (
    EmaReference,
    JointMeanReference,
    kto_reference,
    make_reference,
)


def feed(ref, pos_rewards, aux_rewards, user=0):
    rewards = torch.tensor(list(pos_rewards) + list(aux_rewards), dtype=torch.float64)
    positive = torch.tensor([True] * len(pos_rewards) + [False] * len(aux_rewards))
    ref.update(rewards, positive, torch.full((len(rewards),), user, dtype=torch.long))


def test_ema_update_by_hand():
    ref = EmaReference(1, decay=0.9)
    feed(ref, [1.0, 3.0], [-2.0])  # initialises: m₊ = 2, m_U = −2
    assert ref.delta().item() == pytest.approx(0.0)
    feed(ref, [0.0], [-1.0, -3.0])  # m₊ = 0.9·2 + 0.1·0 = 1.8; m_U = 0.9·(−2) + 0.1·(−2) = −2
    assert ref.delta().item() == pytest.approx((1.8 - 2.0) / 2)
    feed(ref, [4.0], [])  # m₊ = 0.9·1.8 + 0.1·4 = 2.02; m_U unchanged
    assert ref.delta().item() == pytest.approx((2.02 - 2.0) / 2)


def test_first_batch_initialises_each_ema():
    ref = EmaReference(1, decay=0.9)
    assert ref.delta().item() == 0.0
    feed(ref, [5.0], [])  # only m₊ initialised: δ = m₊, not 0.1·5
    assert ref.delta().item() == pytest.approx(5.0)
    feed(ref, [], [-1.0])  # m_U initialised to −1, m₊ untouched
    assert ref.delta().item() == pytest.approx((5.0 - 1.0) / 2)


def test_only_users_in_the_batch_move():
    ref = EmaReference(3, decay=0.5)
    feed(ref, [1.0], [-3.0], user=1)
    assert ref.delta().tolist() == pytest.approx([0.0, -1.0, 0.0])
    feed(ref, [2.0], [0.0], user=2)
    assert ref.delta().tolist() == pytest.approx([0.0, -1.0, 1.0])


def test_joint_mean_by_hand():
    ref = JointMeanReference(2)
    feed(ref, [1.0, 3.0], [-2.0], user=1)
    feed(ref, [2.0], [], user=1)
    assert ref.delta().tolist() == pytest.approx([0.0, (1 + 3 - 2 + 2) / 4])


@pytest.mark.parametrize("aux_per_pos", [1, 3])
def test_ema_reference_is_invariant_to_3_to_1_aux_pos_imbalance_where_joint_mean_drifts(aux_per_pos):
    gen = torch.Generator().manual_seed(0)
    ema, joint = EmaReference(1, decay=0.9), JointMeanReference(1)
    for _ in range(60):
        pos = (1.0 + 0.1 * torch.randn(4, generator=gen)).tolist()
        aux = (-1.0 + 0.1 * torch.randn(4 * aux_per_pos, generator=gen)).tolist()
        feed(ema, pos, aux)
        feed(joint, pos, aux)
    assert abs(ema.delta().item()) < 0.05
    expected_joint = (1.0 - aux_per_pos) / (1 + aux_per_pos)  # 0 at 1:1, −0.5 at 3:1
    assert joint.delta().item() == pytest.approx(expected_joint, abs=0.05)


@pytest.mark.parametrize("kind", ["ema", "joint"])
def test_eval_mode_freezes_delta(kind):
    ref = make_reference(kind, 1)
    feed(ref, [1.0], [-0.5])
    before = ref.delta().clone()
    assert ref.eval() is ref and not ref.training
    feed(ref, [10.0], [10.0])
    assert torch.equal(ref.delta(), before)
    ref.train()
    feed(ref, [10.0], [10.0])
    assert not torch.equal(ref.delta(), before)


@pytest.mark.parametrize("kind", ["ema", "joint"])
def test_state_dict_round_trip_is_exact(kind):
    ref = make_reference(kind, 3, decay=0.7)
    feed(ref, [0.1, 0.7], [-0.3], user=0)
    feed(ref, [1.0 / 3.0], [2.0 / 7.0], user=2)
    state = json.loads(json.dumps(ref.state_dict()))
    restored = make_reference(kind, 3, decay=0.9)
    restored.load_state_dict(state)
    assert restored.state_dict() == ref.state_dict()
    assert torch.equal(restored.delta(), ref.delta())
    for r in (ref, restored):
        feed(r, [0.5], [-0.25], user=1)
        feed(r, [0.2], [0.4], user=0)
    assert torch.equal(restored.delta(), ref.delta())


def test_load_state_dict_rejects_other_kind_or_size():
    ema = EmaReference(2)
    with pytest.raises(ValueError):
        ema.load_state_dict(JointMeanReference(2).state_dict())
    with pytest.raises(ValueError):
        ema.load_state_dict(EmaReference(3).state_dict())


def test_make_reference_kinds():
    assert isinstance(make_reference("ema", 2, decay=0.8), EmaReference)
    assert make_reference("ema", 2, decay=0.8).decay == 0.8
    assert isinstance(make_reference("joint", 2), JointMeanReference)
    with pytest.raises(ValueError):
        make_reference("median", 2)


def test_kto_reference_is_clamped_per_user_and_detached():
    kl = torch.tensor([0.5, -2.0, 1.5, 1.0], requires_grad=True)
    user = torch.tensor([0, 1, 0, 1])
    delta = kto_reference(kl, user, 3, beta=0.1)
    # user 0: mean 1.0 → 0.1; user 1: mean −0.5 → clamped to 0; user 2: no pair → 0
    assert delta.tolist() == pytest.approx([0.1, 0.0, 0.0])
    assert not delta.requires_grad


@pytest.mark.parametrize("kind", ["ema", "joint"])
def test_one_users_state_is_that_of_a_reference_fed_only_its_batches(kind):
    """user_state(u) equals the state of a one-user reference given u's rewards alone, and
    load_user_state puts it back into slot u without touching the others."""
    many, alone = make_reference(kind, 3, 0.9), make_reference(kind, 1, 0.9)
    for pos, aux in (([1.0, 3.0], [-2.0]), ([0.5], [0.25, -1.0])):
        feed(many, pos, aux, user=1)
        feed(many, [9.0], [9.0], user=2)
        feed(alone, pos, aux)
    assert many.user_state(1) == alone.state_dict()
    other = many.user_state(2)
    many.load_user_state(1, make_reference(kind, 1, 0.9).state_dict())
    assert many.user_state(1) == make_reference(kind, 1, 0.9).state_dict() and many.user_state(2) == other
