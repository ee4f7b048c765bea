"""Numerics: a diverging user fails with its reason and never yields NaN weights; extreme
rewards and γ at its bound give finite losses and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from cbpo_orch.data.tasks import Budgets
from cbpo_orch.method import objectives
from cbpo_orch.method.config import LoraSettings, TrainConfig
from cbpo_orch.training.models import load_model
from cbpo_orch.training.multi_lora import attached_multi_lora
from cbpo_orch.training.numerics import NumericalError
from cbpo_orch.training.trainer import UserTraining, encode_samples, train_adapters

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
BUDGETS = Budgets(48, 12)


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    return load_model(tiny_model_dir, "cpu")


def work(tokenizer, u: int, gamma: float = 0.3) -> UserTraining:
    own = [(f"Generate a headline for the following article: user {u} story {i}", f"User {u} headline {i}") for i in range(6)]
    aux = [(f"Generate a headline for the following article: other {u}.{i}", f"Other news {i}") for i in range(6)]
    samples = encode_samples(tokenizer, own, True, BUDGETS) + encode_samples(tokenizer, aux, False, BUDGETS)
    return UserTraining(samples=samples, gamma=gamma, seed=u)


def poison_slot_at(multi, slot: int, step: int):
    """An ``on_step`` callback that makes ``slot``'s adapter NaN after step ``step``, as a
    divergence would."""

    def on_step(t: int, total: int, loss: float) -> None:
        if t == step:
            with torch.no_grad():
                for p in multi.parameters():
                    p[slot].fill_(float("nan"))

    return on_step


def test_a_diverging_user_fails_its_pack_with_the_step_and_the_slot(loaded):
    config = TrainConfig(method="cbpo", epochs=2, lr=1e-2, batch_size=4, lora=LORA)
    users = [work(loaded.tokenizer, u) for u in range(2)]
    with attached_multi_lora(loaded.model, LORA, 2) as multi:
        with pytest.raises(NumericalError, match=r"the cbpo loss became nan at step 3 of \d+ \(slot 1 of the pack\): training diverged"):
            train_adapters(multi, loaded.tokenizer, users, config, "cpu", on_step=poison_slot_at(multi, 1, 2))


def test_nan_weights_at_the_end_are_never_returned(loaded):
    config = TrainConfig(method="sft", epochs=1, lr=1e-2, batch_size=4, lora=LORA)
    user = work(loaded.tokenizer, 0)
    with attached_multi_lora(loaded.model, LORA, 1) as multi:
        steps = len(train_adapters(multi, loaded.tokenizer, [user], config, "cpu")[0].losses)
        with pytest.raises(NumericalError, match="the sft adapter's weights are not finite after training"):
            train_adapters(multi, loaded.tokenizer, [user], config, "cpu", on_step=poison_slot_at(multi, 0, steps))


@pytest.mark.parametrize("method", ["kto", "bco", "cbpo", "cbpo-raw", "cbpo-nnpu"])
def test_extreme_rewards_and_gamma_at_its_bound_give_finite_losses_and_gradients(method):
    rewards = torch.tensor([1e4, -1e4, 3e3, -3e3, 0.0, 1e4], requires_grad=True)
    positive = torch.tensor([True, True, False, False, True, False])
    user = torch.tensor([0, 0, 0, 0, 1, 1])
    gamma = torch.tensor([0.9, 0.999])
    delta = torch.tensor([-5e3, 5e3])
    if method == "kto":
        losses = objectives.kto_loss(rewards, positive, user, delta, 2)
    elif method == "bco":
        losses = objectives.bco_loss(rewards, positive, user, delta, 2)
    else:
        variant = {"cbpo": "nonneg", "cbpo-raw": "raw", "cbpo-nnpu": "nnpu"}[method]
        losses = objectives.cbpo_loss(rewards, positive, user, delta, gamma, 2, variant)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(rewards.grad).all()


def test_training_at_the_gamma_cap_with_a_large_beta_stays_finite(loaded):
    config = TrainConfig(method="cbpo", epochs=2, lr=1e-2, beta=10.0, batch_size=4, lora=LORA)
    with attached_multi_lora(loaded.model, LORA, 1) as multi:
        [result] = train_adapters(multi, loaded.tokenizer, [work(loaded.tokenizer, 0, gamma=config.gamma_max)], config, "cpu")
        weights = multi.slot_state(0)
    assert result.losses and all(math.isfinite(v) for v in result.losses)
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k), "the adapter must have trained"
