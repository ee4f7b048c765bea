"""Exact micro-batching (``trainer.backward_by_rows``): a pass's rows through the model a few at
a time give the whole pass's losses and gradients, for every method, C-BPO's batch-wide δ
and bracket included (fp32, rel 1e-5)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from cbpo_orch.method.config import LoraSettings, TrainConfig
from cbpo_orch.method.objectives import negative_loss, per_user_mean
from cbpo_orch.training.encoding import collate
from cbpo_orch.training.logprobs import completion_logps
from cbpo_orch.training.micro_batch import ACTIVATION_BUDGET, activation_bytes, micro_batch_rows
from cbpo_orch.training.multi_lora import attached_multi_lora
from cbpo_orch.training.trainer import MethodLoss, Sample, UserTraining, backward_by_rows, train_adapters
from tests.helpers import random_batch

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
METHODS = ("sft", "kto", "bco", "cbpo", "cbpo-raw", "cbpo-nnpu")
ROWS = 8
USER = torch.tensor([0, 1] * (ROWS // 2))
POSITIVE = torch.tensor([True, True, True, True, False, False, False, False])
GAMMAS = torch.tensor([0.0, 0.9])
"""User 1's γ makes its bracket negative, user 0's stays positive (checked below)."""


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def one_pass(model, method: str, micro_rows: int):
    """One pass of ``ROWS`` rows of two users: the losses, the adapters' gradients and δ."""
    pairs, batch = random_batch(model.config.vocab_size, seed=5, rows=ROWS)
    config = TrainConfig(method=method, lora=LORA)
    with attached_multi_lora(model, LORA, 2) as multi:
        for slot in range(2):
            multi.init_slot(slot, seed=slot)
        torch.manual_seed(0)
        with torch.no_grad():
            for param in multi.parameters():
                param.normal_(0, 0.05)
            with multi.routed(USER):
                logp0, _ = completion_logps(model, batch)
        # π_ref that puts a user's positives 20 nats above its aux: rewards of ±2 at β = 0.1
        ref = logp0 + torch.where(POSITIVE, -20.0, 20.0)
        kl = torch.linspace(-1.0, 3.0, ROWS) if method == "kto" else None
        loss_fn = MethodLoss(config, GAMMAS)

        def logps_of(part: slice):
            with multi.routed(USER[part]):
                return completion_logps(model, collate(pairs[part], 1))

        losses = backward_by_rows(logps_of, ROWS, micro_rows, lambda logp, n: loss_fn(logp, n, ref, POSITIVE, USER, kl), "cpu")
        grads = [param.grad.clone() for param in multi.parameters()]
        return losses, grads, loss_fn.reference.delta()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("micro_rows", [1, 3])
def test_micro_batches_give_the_whole_pass_losses_and_gradients(model, method, micro_rows):
    whole, parts = one_pass(model, method, ROWS), one_pass(model, method, micro_rows)
    torch.testing.assert_close(parts[0], whole[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(parts[2], whole[2], rtol=1e-5, atol=0)
    for grad, expected in zip(parts[1], whole[1]):
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_the_brackets_have_both_signs(model):
    """The C-BPO cases above cover a user whose bracket is clamped (or ascended) and one whose
    is not: their rewards are +2 on positives and −2 on aux (π_ref set so)."""
    delta = one_pass(model, "cbpo-raw", ROWS)[2].float()
    rewards = torch.where(POSITIVE, 2.0, -2.0)
    neg = negative_loss(rewards, delta[USER])
    bracket = per_user_mean(neg, USER, ~POSITIVE, 2) - GAMMAS * per_user_mean(neg, USER, POSITIVE, 2)
    assert bracket[0] > 0 > bracket[1]


@pytest.mark.parametrize("method", ["kto", "cbpo"])
def test_training_with_micro_batches_gives_the_same_losses(tiny_model_dir, method):
    """train_adapters end to end (KTO's mismatched pairs included): the same step losses."""
    pairs, _ = random_batch(100, seed=6, rows=8)
    user = UserTraining([Sample(pair, i % 2 == 0) for i, pair in enumerate(pairs)], gamma=0.3, seed=0, kl_pairs=pairs[::-1])
    config = TrainConfig(method=method, epochs=1, batch_size=4, lora=LORA)
    losses = []
    for micro_rows in (None, 2):
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        with attached_multi_lora(base, LORA, 1) as multi:
            [result] = train_adapters(multi, _PadOnly(), [user], config, "cpu", micro_rows=micro_rows)
        losses.append(result.losses)
    assert len(losses[0]) == 2
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


class _PadOnly:
    pad_token_id = 1


def test_a_cpu_pass_is_cut_to_the_activation_budget_and_a_cuda_pass_is_not():
    """SmolLM2-135M's shape: rows of 560 tokens (a long review) go one at a time, headline rows
    of 100 several at a time, a tiny model's all at once; on CUDA the pass stays whole."""
    smollm2 = SimpleNamespace(config=LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9), dtype=torch.float32)
    assert micro_batch_rows(smollm2, 8, 560, "cpu") == 1
    rows = micro_batch_rows(smollm2, 8, 100, "cpu")
    assert 1 < rows < 8 and rows * activation_bytes(smollm2.config, 100, torch.float32) <= ACTIVATION_BUDGET
    assert (rows + 1) * activation_bytes(smollm2.config, 100, torch.float32) > ACTIVATION_BUDGET
    tiny = SimpleNamespace(config=LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4), dtype=torch.float32)
    assert micro_batch_rows(tiny, 8, 128, "cpu") == 8
    assert micro_batch_rows(smollm2, 8, 560, torch.device("cuda")) == 8
