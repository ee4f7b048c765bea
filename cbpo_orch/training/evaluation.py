"""Greedy generation for a user's queries and LaMP-style ROUGE (METHOD.md §6)."""

from __future__ import annotations

from contextlib import nullcontext

import torch
from rouge_score import rouge_scorer

from cbpo_orch.data.tasks import Budgets
from cbpo_orch.training.encoding import prompt_ids
from cbpo_orch.training.multi_lora import MultiLora


@torch.no_grad()
def generate(
    model, tokenizer, prompts: list[str], budgets: Budgets, batch_size: int, device, slots: list[int] | None = None, multi: MultiLora | None = None
) -> list[str]:
    """Greedy completions of ``prompts`` (left-padded batches) of at most ``budgets.new_tokens``
    tokens, special tokens stripped; a prompt over its budget raises ``BudgetError``.

    With ``slots`` (one per prompt) and the :class:`MultiLora` that holds them, each prompt is
    answered by its own slot's adapter and prompts of several users share the batches (each
    row's output is the one it gets alone: the rows of a batch only share the base)."""
    if (slots is None) != (multi is None) or (slots is not None and len(slots) != len(prompts)):
        raise ValueError("slots (one per prompt) and the multi-LoRA holding them come together")
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [prompt_ids(tokenizer, x, budgets.prompt_tokens) for x in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        routing = nullcontext() if multi is None else multi.routed(torch.tensor(slots[start : start + batch_size], device=device))
        with routing:
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=budgets.new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        for row in generated[:, width:]:
            outputs.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return outputs


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
