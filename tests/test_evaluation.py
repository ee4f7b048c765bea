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
