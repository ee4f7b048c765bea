"""Chunked completion log-probs (``training/logprobs.py``) against the full-logits formula:
the same log-probs, losses and gradients (fp32, rel 1e-5), and no vocabulary-wide tensor."""

from __future__ import annotations


import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from cbpo_orch.method.config import LoraSettings
from cbpo_orch.method.objectives import cbpo_loss, sft_loss
from cbpo_orch.training import logprobs
from cbpo_orch.training.logprobs import PLAIN_HEAD_FAMILIES, completion_logps, sequence_logps, split_head
from cbpo_orch.training.multi_lora import attached_multi_lora
from tests.helpers import random_batch

VOCAB = 97
CHUNK = 5
"""Positions per chunk in these tests, so that every batch spans several chunks."""
LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
CONFIGS = {
    "llama": LlamaConfig(**LLAMA_LIKE),
    "mistral": MistralConfig(**LLAMA_LIKE),
    "qwen2": Qwen2Config(**LLAMA_LIKE, tie_word_embeddings=False),
    "qwen3": Qwen3Config(**LLAMA_LIKE, head_dim=8),
    "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128),
}


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(logprobs, "CHUNK_BYTES", 4 * VOCAB * CHUNK)


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def full_logits_logps(model, batch):
    """The formula before chunking, inline: full-vocabulary log-softmax at every position."""
    log_probs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[:, :-1].log_softmax(-1)
    token = log_probs.gather(-1, batch.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    mask = batch.completion_mask[:, 1:]
    return (token * mask).sum(-1), mask.sum(-1)


def losses(logp, n_tokens):
    """SFT's and C-BPO's per-user losses of two users, from the same log-probs."""
    rows = logp.shape[0]
    user = torch.arange(rows) % 2
    positive = torch.arange(rows) < rows // 2 + 1
    rewards = 0.1 * (logp - torch.linspace(-40, -10, rows))
    return torch.cat([sft_loss(logp, n_tokens, positive, user, 2), cbpo_loss(rewards, positive, user, 0.2, 0.3, 2, "raw")])


def values_and_grads(model, batch, logps_of):
    """Log-probs, losses and the gradient of every trainable parameter under ``logps_of``."""
    model.zero_grad(set_to_none=True)
    logp, n_tokens = logps_of(model, batch)
    loss = losses(logp, n_tokens)
    loss.sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return logp.detach(), n_tokens, loss.detach(), grads


def assert_same(new, old):
    (logp, n_tokens, loss, grads), (old_logp, old_n, old_loss, old_grads) = new, old
    torch.testing.assert_close(logp, old_logp, rtol=1e-5, atol=0)
    assert n_tokens.tolist() == old_n.tolist()
    torch.testing.assert_close(loss, old_loss, rtol=1e-5, atol=0)
    assert grads.keys() == old_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, old_grads[name], rtol=1e-5, atol=1e-5 * float(old_grads[name].abs().max()), msg=name)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_every_plain_head_family_gives_the_full_logits_numbers(family):
    """Every family taken through the chunked path gives the log-probs, losses and gradients
    (all weights trainable, the head's included) of the full-logits formula."""
    model = build(CONFIGS[family]).requires_grad_(True)
    assert split_head(model) is not None
    _, batch = random_batch(VOCAB)
    assert_same(values_and_grads(model, batch, completion_logps), values_and_grads(model, batch, full_logits_logps))


def test_the_tested_families_are_the_plain_ones():
    assert set(CONFIGS) == PLAIN_HEAD_FAMILIES


def test_multi_lora_training_and_frozen_reference_are_unchanged(tiny_model_dir):
    """A routed multi-LoRA pack (training) and its adapters off (π_ref, no graph): the same
    numbers both ways, on the project's tiny model (tied embeddings)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    pairs, batch = random_batch(model.config.vocab_size, seed=1, rows=6)
    with attached_multi_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0), 2) as multi:
        for slot in range(2):
            multi.init_slot(slot, seed=slot)
        with torch.no_grad():
            for param in multi.parameters():
                param.normal_(0, 0.05)
        with multi.routed(torch.tensor([0, 1, 0, 1, 0, 1])):
            assert_same(values_and_grads(model, batch, completion_logps), values_and_grads(model, batch, full_logits_logps))
        with multi.disabled(), torch.no_grad():
            reference = sequence_logps(model, pairs, 1, 4, "cpu")
            torch.testing.assert_close(reference, full_logits_logps(model, batch)[0], rtol=1e-5, atol=0)


def test_a_peft_model_is_looked_through_with_its_adapter_on_and_off(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.eval()
    assert split_head(peft_model)[1] is model.lm_head
    _, batch = random_batch(model.config.vocab_size, seed=2)
    assert_same(values_and_grads(peft_model, batch, completion_logps), values_and_grads(peft_model, batch, full_logits_logps))
    with peft_model.disable_adapter(), torch.no_grad():
        torch.testing.assert_close(completion_logps(peft_model, batch)[0], full_logits_logps(peft_model, batch)[0], rtol=1e-5, atol=0)


def test_a_soft_capped_head_takes_the_full_logits_path():
    """Gemma-2's logits are soft-capped after the head: not a plain linear map, so the
    model's own logits are used, and the numbers are still the formula's."""
    model = build(Gemma2Config(**LLAMA_LIKE, head_dim=8, final_logit_softcapping=5.0)).requires_grad_(True)
    assert split_head(model) is None
    _, batch = random_batch(VOCAB, seed=3)
    assert_same(values_and_grads(model, batch, completion_logps), values_and_grads(model, batch, full_logits_logps))


class _WidestLogits(TorchDispatchMode):
    """The most positions of any non-view tensor [..., vocab] an op creates, but for the
    head weight's gradient (its transpose is [hidden, vocab])."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.vocab, self.hidden, self.positions = vocab, hidden, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(tensor, torch.Tensor) and tensor.shape[-1:] == (self.vocab,) and tensor.shape != (self.hidden, self.vocab) and not tensor._is_view():
                self.positions = max(self.positions, tensor.numel() // self.vocab)
        return out


def test_no_tensor_is_wider_than_one_chunk_in_forward_and_backward():
    model = build(CONFIGS["qwen2"]).requires_grad_(True)
    _, batch = random_batch(VOCAB, rows=8)
    assert int(batch.completion_mask.sum()) > 4 * CHUNK
    widest = _WidestLogits(VOCAB, model.config.hidden_size)
    with widest:
        logp, _ = completion_logps(model, batch)
        logp.sum().backward()
    assert 0 < widest.positions <= CHUNK


def test_commit_lm_gives_the_full_logits_numbers(commit_lm_dir):
    """The real pretrained model (Llama, 8,192 words, tied head), LoRA on q/v trained."""
    model = AutoModelForCausalLM.from_pretrained(commit_lm_dir, dtype=torch.float32).eval()
    _, batch = random_batch(model.config.vocab_size, seed=4)
    with attached_multi_lora(model, LoraSettings(r=4, alpha=8, dropout=0.0), 1) as multi:
        multi.init_slot(0, seed=0)
        with torch.no_grad():
            for param in multi.parameters():
                param.normal_(0, 0.02)
        with multi.routed(torch.zeros(batch.input_ids.shape[0], dtype=torch.long)):
            assert_same(values_and_grads(model, batch, completion_logps), values_and_grads(model, batch, full_logits_logps))
