"""Activation checkpointing (``MultiLora.checkpointed``): a packed pass of several users gives
the same losses and gradients checkpointed or not (fp32, rel 1e-5), its rows routed to their
own slots when the layers run again in the backward, which comes after the pass's ``routed``
block has closed; and the rule that turns it on (``micro_batch.checkpointing_pays``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from cbpo_orch.method.config import LoraSettings, TrainConfig
from cbpo_orch.training import trainer
from cbpo_orch.training.encoding import collate
from cbpo_orch.training.logprobs import completion_logps
from cbpo_orch.training.micro_batch import checkpointing_pays, micro_batch_rows
from cbpo_orch.training.multi_lora import attached_multi_lora
from cbpo_orch.training.trainer import MethodLoss, Sample, UserTraining, backward_by_rows, train_adapters
from tests.helpers import random_batch

LORA = LoraSettings(r=4, alpha=8, dropout=0.1)
"""Dropout on: a recomputed layer must draw the masks its forward drew."""
ROWS = 8
USER = torch.tensor([0, 1, 2] * 2 + [0, 1])
POSITIVE = torch.tensor([True, False] * (ROWS // 2))


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def one_pass(model, checkpointed: bool, micro_rows: int):
    """One C-BPO pass of three users' rows: the losses, the adapters' gradients, and how many
    times a LoRA layer ran."""
    pairs, batch = random_batch(model.config.vocab_size, seed=3, rows=ROWS)
    with attached_multi_lora(model, LORA, 3) as multi:
        torch.manual_seed(0)
        with torch.no_grad():
            for param in multi.parameters():
                param.normal_(0, 0.05)
        calls = []
        next(iter(multi.layers.values())).register_forward_hook(lambda *_: calls.append(1))
        loss_fn = MethodLoss(TrainConfig(method="cbpo", lora=LORA), torch.tensor([0.0, 0.5, 0.9]))
        ref = torch.linspace(-60.0, -20.0, ROWS)

        def logps_of(part: slice):
            with multi.routed(USER[part]):
                return completion_logps(model, collate(pairs[part], 1))

        model.train()
        torch.manual_seed(1)
        with multi.checkpointed(checkpointed):
            losses = backward_by_rows(logps_of, ROWS, micro_rows, lambda logp, n: loss_fn(logp, n, ref, POSITIVE, USER), "cpu")
        model.eval()
        return losses, [param.grad.clone() for param in multi.parameters()], len(calls)


@pytest.mark.parametrize("micro_rows", [ROWS, 3])
def test_a_checkpointed_pass_gives_the_same_losses_and_gradients(model, micro_rows):
    plain, checkpointed = one_pass(model, False, micro_rows), one_pass(model, True, micro_rows)
    torch.testing.assert_close(checkpointed[0], plain[0], rtol=1e-5, atol=0)
    for grad, expected in zip(checkpointed[1], plain[1]):
        assert expected.abs().max() > 0
        torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    assert checkpointed[2] > plain[2]  # the layers did run again in the backward


def test_the_model_is_plain_again_after_the_block(model):
    with attached_multi_lora(model, LORA, 1) as multi:
        with multi.checkpointed():
            assert model.is_gradient_checkpointing
            assert not model.get_input_embeddings()._forward_hooks
        assert not model.is_gradient_checkpointing
        with multi.checkpointed(False):
            assert not model.is_gradient_checkpointing


def test_training_checkpointed_gives_the_same_losses_and_adapters(tiny_model_dir, monkeypatch):
    """train_adapters end to end, two users packed in one pass, checkpointing forced on."""
    pairs, _ = random_batch(100, seed=6, rows=8)
    users = [UserTraining([Sample(pair, i % 2 == k) for i, pair in enumerate(pairs)], gamma=0.3, seed=k) for k in range(2)]
    config = TrainConfig(method="cbpo", epochs=1, batch_size=4, lora=LORA)
    outcomes = []
    for forced in (False, True):
        monkeypatch.setattr(trainer, "checkpointing_pays", lambda *_, forced=forced: forced)
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        with attached_multi_lora(base, LORA, 2) as multi:
            results = train_adapters(multi, _PadOnly(), users, config, "cpu", per_pass=2)
            outcomes.append(([r.losses for r in results], [multi.slot_state(slot) for slot in range(2)]))
    (losses, adapters), (losses_checkpointed, adapters_checkpointed) = outcomes
    assert len(losses[0]) == 2
    for user in range(2):
        assert losses_checkpointed[user] == pytest.approx(losses[user], rel=1e-5)
        for key, value in adapters[user].items():
            torch.testing.assert_close(adapters_checkpointed[user][key], value, rtol=1e-5, atol=1e-6)


class _PadOnly:
    pad_token_id = 1


SMOLLM2 = SimpleNamespace(
    config=LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9),
    dtype=torch.float32,
    supports_gradient_checkpointing=True,
)


def test_a_cpu_pass_past_the_budget_is_checkpointed_and_then_goes_whole():
    """SmolLM2-135M's shape: 8 rows of 560 tokens (a long review) would keep 11 GiB; checkpointed
    they keep under 1 GiB and go at once. 2,048-token rows go one at a time even so. A tiny
    pass, a CUDA pass, and a model that cannot checkpoint are left as they are."""
    assert checkpointing_pays(SMOLLM2, 8, 560, "cpu")
    assert micro_batch_rows(SMOLLM2, 8, 560, "cpu", checkpointed=True) == 8
    assert micro_batch_rows(SMOLLM2, 8, 2048, "cpu", checkpointed=True) == 1
    assert not checkpointing_pays(SMOLLM2, 1, 60, "cpu")
    assert not checkpointing_pays(SMOLLM2, 8, 560, torch.device("cuda"))
    assert not checkpointing_pays(SimpleNamespace(config=SMOLLM2.config, dtype=torch.float32), 8, 560, "cpu")

