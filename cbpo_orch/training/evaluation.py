"""LaMP-style ROUGE and the paired bootstrap of arm differences (METHOD.md §6)."""

from __future__ import annotations

from rouge_score import rouge_scorer


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean over queries of ROUGE-1 and ROUGE-L F1, no stemming (LaMP's evaluation)."""
    if len(predictions) != len(references) or not references:
        raise ValueError("rouge needs one prediction per reference, and at least one")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references)]
    return {
        "rouge1": sum(s["rouge1"].fmeasure for s in scores) / len(scores),
        "rougeL": sum(s["rougeL"].fmeasure for s in scores) / len(scores),
    }


def paired_bootstrap_ci(
    arm: list[float], baseline: list[float], resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of per-user differences ``arm − baseline`` and its percentile bootstrap CI.

    Users are resampled with replacement (the same users for both arms: paired).
    Returns ``(mean, low, high)``.
    """
    import numpy as np

    diffs = np.asarray(arm, dtype=float) - np.asarray(baseline, dtype=float)
    if diffs.size == 0:
        raise ValueError("paired_bootstrap_ci needs at least one user")
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, diffs.size, size=(resamples, diffs.size))].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(diffs.mean()), float(low), float(high)
