"""Many users' LoRA adapters in one pass (``multi_lora``, ``multi_optim``) against peft.

The model is the tiny causal LM with RANDOM weights built from a config for tests
(``tests/tiny_model.py``); it claims nothing about quality, only that the packed path
computes what peft + torch's AdamW compute for each user alone. CPU, fp32, dropout 0.
Tolerances: init and export are bit-exact; logits within 1e-5 absolute; optimiser steps
within 1e-6 relative; whole training runs within 1e-5 relative (1e-6 absolute).
"""

from __future__ import annotations

import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
import math
import random

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn
from transformers import AutoModelForCausalLM, get_linear_schedule_with_warmup

from cbpo_orch.method.config import LoraSettings
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.method.objectives import sft_loss
from cbpo_orch.training.encoding import EncodedPair, collate
from cbpo_orch.training.logprobs import completion_logps
from cbpo_orch.training.multi_lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MultiLora, attached_multi_lora
from cbpo_orch.training.multi_optim import SlotAdamW, linear_warmup_decay
from cbpo_orch.training.trainer import Sample, UserTraining, mixed_batches, train_adapters

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
LR, WEIGHT_DECAY, MAX_GRAD_NORM, WARMUP_RATIO = 1e-2, 0.01, 0.3, 0.1
BATCH_SIZE, EPOCHS = 3, 2
USER_ITEMS = (3, 5, 8, 11)
USER_SEEDS = (11, 12, 13, 14)


def load_base(model_dir, dtype=torch.float32) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)


def random_pairs(n: int, seed: int, vocab: int) -> list[EncodedPair]:
    """``n`` pairs of random ids, prompts of 2–6 tokens and completions of 1–5."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt_len, completion_len = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((2, 7), (1, 6)))
        ids = torch.randint(0, vocab, (prompt_len + completion_len,), generator=g)
        pairs.append(EncodedPair(tuple(ids.tolist()), prompt_len))
    return pairs


@contextmanager
def attached_adapter(model, lora: LoraSettings, seed: int):
    """The stock single-user path this layer must match: one peft adapter on ``model``."""
    torch.manual_seed(seed)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(lora.target_modules), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    try:
        yield peft_model
    finally:
        peft_model.unload()


def adapter_files(peft_model) -> dict[str, bytes]:
    """What peft's ``save_pretrained`` writes for ``peft_model``'s adapter."""
    with tempfile.TemporaryDirectory() as tmp:
        peft_model.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def write_folder(files: dict[str, bytes], folder):
    folder.mkdir()
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tensors here are tiny: extra threads only add overhead, and on a busy machine
    they make each step many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pad_id(tiny_model_dir) -> int:
    return load_base(tiny_model_dir).config.pad_token_id


ALL_ATTENTION = LoraSettings(r=16, alpha=16, dropout=0.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lora", [LORA, ALL_ATTENTION], ids=["q-v", "all-attention"])
def test_init_slot_is_the_adapter_peft_creates_for_the_seed(tiny_model_dir, lora, dtype):
    expected = {}
    for seed in (0, 7):
        with attached_adapter(load_base(tiny_model_dir, dtype), lora, seed) as peft_model:
            expected[seed] = {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    multi = MultiLora(load_base(tiny_model_dir, dtype), lora, n_slots=3)
    rng_before = torch.get_rng_state()
    multi.init_slot(2, 0)
    multi.init_slot(0, 7)
    assert torch.equal(torch.get_rng_state(), rng_before)
    for slot, seed in ((2, 0), (0, 7)):
        state = multi.slot_state(slot)
        assert state.keys() == expected[seed].keys()
        assert all(state[k].dtype == torch.float32 and torch.equal(state[k], expected[seed][k]) for k in state)
    assert all(not v.any() for v in multi.slot_state(1).values())


def test_a_fresh_slot_exports_the_files_peft_saves(tiny_model_dir):
    with attached_adapter(load_base(tiny_model_dir), LORA, 5) as peft_model:
        expected = adapter_files(peft_model)
    multi = MultiLora(load_base(tiny_model_dir), LORA, n_slots=2)
    multi.init_slot(1, 5)
    files = multi.export_slot(1)
    assert set(files) == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    assert files[ADAPTER_WEIGHTS] == expected[ADAPTER_WEIGHTS]
    ours, theirs = (json.loads(f[ADAPTER_CONFIG]) for f in (files, expected))
    assert sorted(ours.pop("target_modules")) == sorted(theirs.pop("target_modules")) == ["q_proj", "v_proj"]
    assert ours == theirs and ours["base_model_name_or_path"] == str(tiny_model_dir)


@pytest.fixture
def random_multi(tiny_model_dir):
    """Three slots with random non-zero A and B on the tiny model."""
    multi = MultiLora(load_base(tiny_model_dir), LORA, n_slots=3)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in multi.parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    return multi


def test_reset_slot_refills_one_slot_and_clears_its_gradient(random_multi, tiny_model_dir):
    others = {slot: random_multi.slot_state(slot) for slot in (0, 2)}
    for param in random_multi.parameters():
        param.grad = torch.ones_like(param)
    random_multi.reset_slot(1, seed=9)
    fresh = MultiLora(load_base(tiny_model_dir), LORA, n_slots=1)
    fresh.init_slot(0, seed=9)
    assert all(torch.equal(random_multi.slot_state(1)[k], v) for k, v in fresh.slot_state(0).items())
    assert all(torch.equal(random_multi.slot_state(slot)[k], v) for slot, state in others.items() for k, v in state.items())
    for param in random_multi.parameters():
        assert not param.grad[1].any() and param.grad[[0, 2]].eq(1).all()


def test_an_exported_slot_loads_into_peft_unchanged(random_multi, tiny_model_dir, tmp_path):
    folder = write_folder(random_multi.export_slot(1), tmp_path / "slot1")
    loaded = PeftModel.from_pretrained(load_base(tiny_model_dir), str(folder))
    config = loaded.peft_config["default"]
    assert (config.r, config.lora_alpha, set(config.target_modules)) == (LORA.r, LORA.alpha, set(LORA.target_modules))
    state, expected = get_peft_model_state_dict(loaded), random_multi.slot_state(1)
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_a_saved_adapter_loads_into_any_slot_exactly_and_a_foreign_layout_is_refused(random_multi, tiny_model_dir):
    from safetensors.torch import load as load_safetensors

    saved = load_safetensors(random_multi.export_slot(1)[ADAPTER_WEIGHTS])
    serving = MultiLora(load_base(tiny_model_dir), LORA, n_slots=3)
    serving.load_slot(2, saved)
    assert all(torch.equal(serving.slot_state(2)[k], v) for k, v in random_multi.slot_state(1).items())
    assert not any(t.any() for slot in (0, 1) for t in serving.slot_state(slot).values())  # the other slots are untouched
    with pytest.raises(ValueError, match="missing"):
        serving.load_slot(1, {k: v for k, v in saved.items() if "v_proj" not in k})
    wider = MultiLora(load_base(tiny_model_dir), LoraSettings(r=LORA.r * 2, alpha=LORA.alpha, target_modules=LORA.target_modules), n_slots=1)
    with pytest.raises(ValueError, match="in the adapter but"):
        wider.load_slot(0, saved)


def test_routed_rows_give_the_logits_of_peft_with_their_slots_export(random_multi, tiny_model_dir, pad_id, tmp_path):
    batch = collate(random_pairs(7, seed=1, vocab=random_multi.model.config.vocab_size), pad_id)
    slots = torch.tensor([2, 0, 1, 2, 0, 1, 2])
    with random_multi.routed(slots) as model, torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    for slot in range(3):
        folder = write_folder(random_multi.export_slot(slot), tmp_path / f"slot{slot}")
        peft_model = PeftModel.from_pretrained(load_base(tiny_model_dir), str(folder))
        rows = slots == slot
        with torch.no_grad():
            expected = peft_model(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows]).logits
        torch.testing.assert_close(logits[rows], expected, rtol=0, atol=1e-5)


def test_one_slot_for_every_row_equals_routing_each_row_to_it(random_multi, pad_id):
    """``only(k)`` (generation, held-out scoring: any batch size) is ``routed`` with every row on k."""
    batch = collate(random_pairs(5, seed=3, vocab=random_multi.model.config.vocab_size), pad_id)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        with random_multi.routed(torch.full((5,), 2, dtype=torch.long)) as model:
            expected = model(**inputs).logits
        with random_multi.only(2) as model:
            torch.testing.assert_close(model(**inputs).logits, expected, rtol=0, atol=1e-6)
        with random_multi.only(1) as model:
            assert not torch.allclose(model(**inputs).logits, expected)


def test_disabled_and_unloaded_give_the_base_model(random_multi, tiny_model_dir, pad_id):
    batch = collate(random_pairs(4, seed=2, vocab=random_multi.model.config.vocab_size), pad_id)
    base = load_base(tiny_model_dir)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        expected = base(**inputs).logits
        with random_multi.disabled() as model:
            assert torch.equal(model(**inputs).logits, expected)
        with random_multi.routed(torch.zeros(4, dtype=torch.long)) as model:
            assert not torch.allclose(model(**inputs).logits, expected)
        model = random_multi.unload()
        assert model.state_dict().keys() == base.state_dict().keys()
        assert torch.equal(model(**inputs).logits, expected)


def test_a_forward_needs_a_routing_for_every_row(tiny_model_dir, pad_id):
    batch = collate(random_pairs(2, seed=4, vocab=64), pad_id)
    with attached_multi_lora(load_base(tiny_model_dir), LORA, n_slots=2) as multi:
        with pytest.raises(RuntimeError, match="routing"):
            multi.model(input_ids=batch.input_ids)
        with pytest.raises(ValueError, match="rows"), multi.routed(torch.zeros(3, dtype=torch.long)):
            multi.model(input_ids=batch.input_ids)
        with pytest.raises(ValueError, match="0..1"), multi.routed(torch.tensor([0, 2])):
            pass
    assert isinstance(multi.model.get_submodule("model.layers.0.self_attn.q_proj"), nn.Linear)


@pytest.mark.parametrize("warmup,total", [(0, 5), (1, 4), (2, 9), (3, 3)])
def test_the_schedule_is_transformers_linear_warmup(warmup, total):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total)
    expected = []
    for _ in range(total + 2):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    steps = torch.arange(total + 2)
    factors = linear_warmup_decay(steps, torch.full_like(steps, warmup), torch.full_like(steps, total))
    assert factors.tolist() == pytest.approx(expected, rel=1e-12, abs=0)


def test_slot_adamw_is_torch_adamw_with_clipping_and_schedule_per_slot():
    """Slots of different gradient scales (slot 0 never clipped, 1 and 2 always), schedules
    and activity; each slot equals torch's AdamW run on that slot's steps alone."""
    n_slots, shapes = 3, [(3, 4, 5), (3, 6, 4)]
    totals, warmups, scales = (5, 3, 7), (1, 1, 2), torch.tensor([0.01, 1.0, 10.0])
    activity = [(1, 1, 1), (1, 0, 1), (1, 1, 0), (0, 1, 1), (1, 1, 1)]
    g = torch.Generator().manual_seed(0)
    stacked = [nn.Parameter(torch.randn(shape, generator=g)) for shape in shapes]
    alone = [[nn.Parameter(p[slot].detach().clone()) for p in stacked] for slot in range(n_slots)]
    optimizers = [torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY) for params in alone]
    schedulers = [get_linear_schedule_with_warmup(o, w, t) for o, w, t in zip(optimizers, warmups, totals)]
    packed = SlotAdamW(stacked, n_slots, lr=LR, max_grad_norm=MAX_GRAD_NORM, weight_decay=WEIGHT_DECAY)
    for slot in range(n_slots):
        packed.reset_slot(slot, totals[slot], warmups[slot])

    for active in activity:
        grads = [torch.randn(shape, generator=g) * scales.reshape(-1, 1, 1) for shape in shapes]
        before = [p.detach().clone() for p in stacked]
        for param, grad in zip(stacked, grads):
            param.grad = grad.clone()
        norms = packed.step(torch.tensor(active, dtype=torch.bool))
        packed.zero_grad()
        for slot in range(n_slots):
            if not active[slot]:
                assert all(torch.equal(p[slot], b[slot]) for p, b in zip(stacked, before))
                continue
            for param, grad in zip(alone[slot], grads):
                param.grad = grad[slot].clone()
            norm = torch.nn.utils.clip_grad_norm_(alone[slot], MAX_GRAD_NORM)
            optimizers[slot].step()
            schedulers[slot].step()
            torch.testing.assert_close(norms[slot], norm, rtol=1e-6, atol=0)
            for param, reference in zip(stacked, alone[slot]):
                torch.testing.assert_close(param[slot], reference.detach(), rtol=1e-6, atol=1e-7)
    assert packed.steps.tolist() == [4, 4, 4]


# The equivalence of packed and single-user training.


def batch_plan(n_items: int, seed: int) -> list[list[int]]:
    """One user's batches over all epochs, drawn as the trainer draws them."""
    rng = random.Random(seed)
    return [batch for _ in range(EPOCHS) for batch in mixed_batches(list(range(n_items)), [], BATCH_SIZE, rng)]


def warmup_steps(total: int) -> int:
    return math.ceil(WARMUP_RATIO * total)


def train_alone(base, pairs, plan, seed, pad_id):
    """The single-user recipe: peft adapter, torch AdamW, clip_grad_norm_, linear schedule."""
    with attached_adapter(base, LORA, seed) as peft_model:
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=LR, weight_decay=WEIGHT_DECAY)
        scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps(len(plan)), len(plan))
        losses = []
        for idx in plan:
            logp, n_tokens = completion_logps(peft_model, collate([pairs[i] for i in idx], pad_id))
            rows = len(idx)
            loss = sft_loss(logp, n_tokens, torch.ones(rows, dtype=torch.bool), torch.zeros(rows, dtype=torch.long), 1).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        return losses, {k: v.clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def test_packed_training_equals_each_user_trained_alone(tiny_model_dir, pad_id):
    """train_adapters with 4 users of unequal sizes in one pass gives each user the losses
    and weights of the stock single-user recipe (peft + torch AdamW) run for it alone."""
    base = load_base(tiny_model_dir)
    vocab = base.config.vocab_size
    users = [random_pairs(n, seed=100 + u, vocab=vocab) for u, n in enumerate(USER_ITEMS)]
    plans = [batch_plan(n, seed=USER_SEEDS[u]) for u, n in enumerate(USER_ITEMS)]
    assert len({len(plan) for plan in plans}) == len(plans)

    config = TrainConfig(
        method="sft", epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM, warmup_ratio=WARMUP_RATIO, lora=LORA,
    )
    work = [UserTraining([Sample(pair, True) for pair in pairs], seed=USER_SEEDS[u]) for u, pairs in enumerate(users)]
    with attached_multi_lora(load_base(tiny_model_dir), LORA, len(users)) as multi:
        results = train_adapters(multi, _Tokenizer(pad_id), work, config, "cpu", per_pass=len(users))
        packed_weights = [multi.slot_state(slot) for slot in range(len(users))]
    for user, (pairs, plan) in enumerate(zip(users, plans)):
        losses, weights = train_alone(base, pairs, plan, USER_SEEDS[user], pad_id)
        assert results[user].losses == pytest.approx(losses, rel=1e-5)
        assert packed_weights[user].keys() == weights.keys()
        for key, value in weights.items():
            torch.testing.assert_close(packed_weights[user][key], value, rtol=1e-5, atol=1e-6)
        assert max(value.abs().max() for key, value in weights.items() if "lora_B" in key) > LR / 2


class _Tokenizer:
    """All train_adapters needs of a tokenizer here: the pad id."""

    def __init__(self, pad_id: int):
        self.pad_token_id = pad_id
