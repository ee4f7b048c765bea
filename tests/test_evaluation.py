"""ROUGE as LaMP computes it, and the paired bootstrap."""

import pytest

from cbpo_orch.training.evaluation import paired_bootstrap_ci, rouge


def test_rouge_is_unstemmed_f1_averaged_over_queries():
    # query 1: pred "the cats sat", ref "the cat sat": unigram overlap {the, sat} = 2 → P = R = 2/3, F = 2/3
    # (with stemming "cats" would match "cat" and give 1.0); LCS = "the sat" → also 2/3.
    # query 2: exact match → 1.0.  Means: (2/3 + 1) / 2.
    scores = rouge(["the cats sat", "Hello, World!"], ["the cat sat", "hello world"])
    assert scores["rouge1"] == pytest.approx((2 / 3 + 1) / 2)
    assert scores["rougeL"] == pytest.approx((2 / 3 + 1) / 2)


def test_rouge_l_uses_longest_common_subsequence():
    # pred "a b c d", ref "a c b d": unigrams all match (F1 = 1); LCS length 3 → P = R = 3/4.
    scores = rouge(["a b c d"], ["a c b d"])
    assert scores["rouge1"] == pytest.approx(1.0)
    assert scores["rougeL"] == pytest.approx(0.75)


def test_rouge_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        rouge(["a"], [])


def test_paired_bootstrap_constant_difference_has_zero_width():
    mean, low, high = paired_bootstrap_ci([0.3, 0.5, 0.7], [0.2, 0.4, 0.6])
    assert (mean, low, high) == pytest.approx((0.1, 0.1, 0.1))


def test_paired_bootstrap_brackets_the_mean_and_is_paired():
    arm = [0.1, 0.9, 0.2, 0.8, 0.5, 0.6]
    base = [a - d for a, d in zip(arm, [0.05, 0.15, 0.0, 0.1, 0.2, 0.1])]
    mean, low, high = paired_bootstrap_ci(arm, base, seed=1)
    assert mean == pytest.approx(0.1)
    assert 0.0 <= low < mean < high <= 0.2
    assert paired_bootstrap_ci(arm, base, seed=1) == (mean, low, high)


@pytest.fixture(scope="module")
def untied_tiny(tmp_path_factory):
    from cbpo_orch.training.models import load_model
    from tests.tiny_model import build_tiny_model

    return load_model(build_tiny_model(tmp_path_factory.mktemp("tiny-untied"), seed=3, tie_embeddings=False), "cpu")


def test_prompts_of_several_users_share_batches_and_each_gets_its_own_answer(untied_tiny):
    """generate with slots: each row answered by its own slot's adapter, as it is alone."""
    import torch

    from cbpo_orch.data.tasks import Budgets
    from cbpo_orch.method.config import LoraSettings
    from cbpo_orch.training.generation import generate
    from cbpo_orch.training.multi_lora import attached_multi_lora

    loaded, budgets = untied_tiny, Budgets(prompt_tokens=64, new_tokens=6)
    prompts = ["Generate a headline for this article: the mayor spoke", "Generate a headline: rain all week",
               "Generate a headline for this article: a new park opens downtown", "Generate a headline: markets fell",
               "Generate a headline for this article: schools close early", "Generate a headline: a quiet election"]
    slots = [0, 1, 2, 1, 0, 2]
    with attached_multi_lora(loaded.model, LoraSettings(dropout=0.0), n_slots=3) as multi:
        generator = torch.Generator().manual_seed(0)
        for layer in multi.layers.values():
            for slot in (1, 2):
                layer.lora_A.data[slot] = torch.randn(layer.lora_A.shape[1:], generator=generator) * 0.5
                layer.lora_B.data[slot] = torch.randn(layer.lora_B.shape[1:], generator=generator) * 0.5
        together = generate(loaded.model, loaded.tokenizer, prompts, budgets, 4, "cpu", slots=slots, multi=multi)
        alone = []
        for prompt, slot in zip(prompts, slots):
            with multi.only(slot):
                alone.append(generate(loaded.model, loaded.tokenizer, [prompt], budgets, 1, "cpu")[0])
        with multi.only(0):
            base = generate(loaded.model, loaded.tokenizer, prompts, budgets, 4, "cpu")
    assert together == alone
    assert any(a != b for a, b, s in zip(alone, base, slots) if s), "the adapters must change some answer"


def test_slots_come_with_their_multi_lora_one_per_prompt(untied_tiny):
    from cbpo_orch.data.tasks import Budgets
    from cbpo_orch.training.generation import generate

    with pytest.raises(ValueError, match="one per prompt"):
        generate(untied_tiny.model, untied_tiny.tokenizer, ["a", "b"], Budgets(64, 4), 2, "cpu", slots=[0])


def test_results_aggregate_gives_each_method_its_paired_difference_from_base():
    """`results --aggregate`: per method, the mean per-user ROUGE-1 difference from base over
    the users both scored, with its paired CI; none for base itself or for a lone user."""
    from cbpo_orch.cli.job_commands import _aggregate, _versus_cell

    def row(user, method, rouge1):
        return {"user_id": user, "method": method, "rouge1": rouge1, "rougeL": rouge1, "gamma": None, "seconds": 1.0}

    rows = [row(u, "base", r) for u, r in (("a", 0.1), ("b", 0.2), ("c", 0.3), ("d", 0.4))]
    rows += [row(u, "sft", r) for u, r in (("a", 0.2), ("b", 0.2), ("c", 0.5), ("d", None))]
    rows += [row("a", "cbpo", 0.9), row("e", "cbpo", 0.1)]
    by_method = {m["method"]: m for m in _aggregate(rows)}
    sft = by_method["sft"]
    assert sft["rouge1_vs_base"] == pytest.approx(0.1)  # differences 0.1, 0, 0.2 (user d unscored)
    assert 0.0 <= sft["rouge1_vs_base_low"] < 0.1 < sft["rouge1_vs_base_high"] <= 0.2 + 1e-12
    assert _versus_cell(sft).startswith("+0.1000 [+0.0")
    for lone in (by_method["base"], by_method["cbpo"]):
        assert lone["rouge1_vs_base"] is None and _versus_cell(lone) == "—"
