"""Pairs to ids, completion masks, and completion log-probabilities (tiny random model)."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cbpo_orch.data.tasks import Budgets
from cbpo_orch.training.encoding import BudgetError, EncodedPair, check_prompts, collate, encode_pair, within_budget
from cbpo_orch.training.logprobs import completion_logps

PAIRS = [
    ("Generate a headline for the following article: the city council voted on the new budget", "Council passes budget"),
    ("short prompt", "A somewhat longer completion than the prompt itself"),
    ("Generate a headline for the following article: rain", "Rain"),
]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir), AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_completion_within_budget_ends_with_eos(tiny):
    tokenizer, _ = tiny
    pair = encode_pair(tokenizer, "Generate a headline: rain", "the headline", Budgets(64, 32))
    assert list(pair.input_ids[pair.prompt_len :]) == _ids(tokenizer, "the headline") + [tokenizer.eos_token_id]
    assert list(pair.input_ids[: pair.prompt_len]) == _ids(tokenizer, "Generate a headline: rain\n")


def test_a_long_completion_keeps_its_budget_and_is_not_taught_to_stop(tiny):
    tokenizer, _ = tiny
    target = "a long review of the guitar strings " * 40
    assert len(_ids(tokenizer, target)) > 100
    pair = encode_pair(tokenizer, "Write a review", target, Budgets(64, 100))
    completion = list(pair.input_ids[pair.prompt_len :])
    assert completion == _ids(tokenizer, target)[:100]
    assert tokenizer.eos_token_id not in completion


def test_a_prompt_over_budget_is_an_error_never_cut(tiny):
    tokenizer, _ = tiny
    with pytest.raises(BudgetError, match="exceeds the prompt budget of 32"):
        encode_pair(tokenizer, "word " * 200, "the headline", Budgets(32, 32))
    pairs = [("word " * 200, "long"), ("short prompt", "kept")]
    assert within_budget(tokenizer, pairs, 32) == [("short prompt", "kept")]


def test_check_prompts_names_the_longest_and_the_model_context(tiny):
    tokenizer, _ = tiny
    prompts = [("user a, query 1", "short"), ("user b, query 2", "word " * 200), ("user c, query 3", "word " * 100)]
    with pytest.raises(BudgetError) as error:
        check_prompts(tokenizer, prompts, Budgets(64, 8), model_context=512)
    message = str(error.value)
    longest = len(_ids(tokenizer, "word " * 200 + "\n"))
    assert "2 of 3 query prompts" in message and f"longest: {longest} tokens, user b, query 2" in message
    assert f"--max-prompt-tokens to at least {longest}" in message and "\n" not in message
    check_prompts(tokenizer, prompts, Budgets(longest, 8), model_context=512)
    with pytest.raises(BudgetError, match="exceeds the model's context of 512"):
        check_prompts(tokenizer, prompts[:1], Budgets(500, 100), model_context=512)


def test_collate_right_pads_and_masks_only_completion_tokens():
    batch = collate([EncodedPair((5, 6, 7), 2), EncodedPair((5, 6, 7, 8, 9), 1)], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch.completion_mask.tolist() == [[False, False, True, False, False], [False, True, True, True, True]]


def test_completion_logps_equal_the_sum_of_completion_token_log_softmax(tiny):
    """Only the tail of each batch goes through the LM head; the numbers must not change."""
    tokenizer, model = tiny
    pairs = [encode_pair(tokenizer, x, y, Budgets(64, 32)) for x, y in PAIRS]
    batch = collate(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        logp, n_tokens = completion_logps(model, batch)
        for row, pair in enumerate(pairs):
            ids = torch.tensor([pair.input_ids])
            log_probs = model(input_ids=ids).logits[0].log_softmax(-1)
            expected = sum(log_probs[t - 1, pair.input_ids[t]] for t in range(pair.prompt_len, len(pair.input_ids)))
            assert logp[row].item() == pytest.approx(expected.item(), abs=1e-4)
            assert n_tokens[row].item() == len(pair.input_ids) - pair.prompt_len
