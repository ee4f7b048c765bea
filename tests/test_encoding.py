"""Pairs to ids, completion masks, and completion log-probabilities (tiny random model)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cbpo_orch.method.encoding import EncodedPair, collate, completion_logps, encode_pair

PAIRS = [
    ("Generate a headline for the following article: the city council voted on the new budget", "Council passes budget"),
    ("short prompt", "A somewhat longer completion than the prompt itself"),
    ("Generate a headline for the following article: rain", "Rain"),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_encode_pair_keeps_the_completion_and_its_eos_within_max_length(tiny):
    tokenizer, _ = tiny
    pair = encode_pair(tokenizer, "word " * 200, "the headline", max_length=32)
    completion = list(pair.input_ids[pair.prompt_len :])
    assert len(pair.input_ids) <= 32
    assert completion == tokenizer("the headline", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_collate_right_pads_and_masks_only_completion_tokens():
    batch = collate([EncodedPair((5, 6, 7), 2), EncodedPair((5, 6, 7, 8, 9), 1)], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.completion_mask.tolist() == [[False, False, True, False, False], [False, True, True, True, True]]


def test_completion_logps_equal_the_sum_of_completion_token_log_softmax(tiny):
    """Only the tail of each batch goes through the LM head; the numbers must not change."""
    tokenizer, model = tiny
    pairs = [encode_pair(tokenizer, x, y, max_length=64) for x, y in PAIRS]
    batch = collate(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        logp, n_tokens = completion_logps(model, batch)
        for row, pair in enumerate(pairs):
            ids = torch.tensor([pair.input_ids])
            log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
            expected = sum(log_probs[t - 1, pair.input_ids[t]] for t in range(pair.prompt_len, len(pair.input_ids)))
            assert logp[row].item() == pytest.approx(expected.item(), abs=1e-4)
            assert n_tokens[row].item() == len(pair.input_ids) - pair.prompt_len
