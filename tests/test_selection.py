"""Do-no-harm epoch selection: the held-out slice, the choice of epoch, and the trainer
ending at the chosen epoch's weights (tiny random model)."""

from __future__ import annotations

import pytest
import torch

from cbpo_orch.data.tasks import Budgets
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.method.selection import best_epoch, holdout_size, split_holdout
from cbpo_orch.training.encoding import encode_pair
from cbpo_orch.training.models import load_model
from cbpo_orch.training.multi_lora import attached_multi_lora
from cbpo_orch.training.trainer import UserTraining, encode_samples, held_out_logp, train_adapters


@pytest.mark.parametrize("n, expected", [(5, 0), (6, 2), (10, 2), (11, 3), (16, 4), (40, 8), (300, 8)])
def test_holdout_is_a_fifth_from_two_to_eight_above_the_threshold(n, expected):
    assert holdout_size(n, min_items=6) == expected


def test_split_holdout_takes_the_most_recent_items():
    assert split_holdout(list(range(12)), 6) == (list(range(9)), [9, 10, 11])
    assert split_holdout([1, 2, 3], 6) == ([1, 2, 3], [])


@pytest.mark.parametrize("scores, expected", [([0.3], 0), ([0.3, 0.2, 0.1], 0), ([0.1, 0.3, 0.3], 1), ([0.1, 0.2, 0.4], 2), ([0.2, 0.2], 0)])
def test_best_epoch_keeps_the_start_unless_an_epoch_beats_it_strictly(scores, expected):
    assert best_epoch(scores) == expected


def test_trainer_ends_at_the_best_epochs_weights(tiny_model_dir):
    loaded = load_model(tiny_model_dir, "cpu")
    pairs = [(f"Generate a headline for the following article: story {i}", f"Headline {i}") for i in range(8)]
    aux = [(f"Generate a headline for the following article: other {i}", f"Other {i}") for i in range(8)]
    budgets = Budgets(64, 16)
    samples = encode_samples(loaded.tokenizer, pairs, True, budgets) + encode_samples(loaded.tokenizer, aux, False, budgets)
    config = TrainConfig(method="cbpo", epochs=3, lr=5e-3)
    with attached_multi_lora(loaded.model, config.lora, n_slots=1) as multi:
        trainable = multi.parameters()
        seen, scores = [], iter([0.1, 0.2, 0.5, 0.3])

        def validate():
            seen.append([p.detach().clone() for p in trainable])
            return next(scores)

        [result] = train_adapters(multi, loaded.tokenizer, [UserTraining(samples, 0.3, validate=validate)], config, loaded.device)
        assert result.selected_epoch == 2 and result.validation_scores == [0.1, 0.2, 0.5, 0.3]
        assert all(torch.equal(p, kept) for p, kept in zip(trainable, seen[2]))
        assert not all(torch.equal(p, last) for p, last in zip(trainable, seen[3]))


def test_the_selection_score_is_the_mean_log_probability_per_completion_token(tiny_model_dir):
    """held_out_logp = Σ log p(completion tokens) / number of completion tokens, computed
    here by hand from the model's logits, one item at a time."""
    loaded = load_model(tiny_model_dir, "cpu")
    budgets = Budgets(64, 16)
    pairs = [encode_pair(loaded.tokenizer, f"Generate a headline for: story {i}", "A" * (i + 1), budgets) for i in range(3)]
    total, n_tokens = 0.0, 0
    with torch.no_grad():
        for pair in pairs:
            ids = torch.tensor([pair.input_ids])
            logprobs = torch.log_softmax(loaded.model(ids).logits[0].double(), -1)
            for t in range(pair.prompt_len, len(pair.input_ids)):
                total += float(logprobs[t - 1, pair.input_ids[t]])
                n_tokens += 1
    score = held_out_logp(loaded.model, pairs, loaded.tokenizer.pad_token_id, 2, "cpu")
    assert score == pytest.approx(total / n_tokens, rel=1e-4)


def test_selection_keeps_an_epoch_that_fits_the_users_held_out_texts_better(tiny_model_dir):
    """Training on a user's texts makes their unseen texts of the same kind more likely:
    the held-out score rises and a trained epoch, not the starting model, is kept."""
    loaded = load_model(tiny_model_dir, "cpu")
    budgets = Budgets(64, 16)
    pairs = [(f"Generate a headline for the following article: story {i}", "Breaking News Today") for i in range(10)]
    samples = encode_samples(loaded.tokenizer, pairs[:8], True, budgets)
    held = [encode_pair(loaded.tokenizer, x, y, budgets) for x, y in pairs[8:]]
    config = TrainConfig(method="sft", epochs=3, lr=5e-3, batch_size=4)
    with attached_multi_lora(loaded.model, config.lora, n_slots=1) as multi:
        score = lambda: held_out_logp(loaded.model, held, loaded.tokenizer.pad_token_id, 4, "cpu")  # noqa: E731
        [result] = train_adapters(multi, loaded.tokenizer, [UserTraining(samples, validate=score)], config, loaded.device)
    scores = result.validation_scores
    assert scores[-1] > scores[0] and result.selected_epoch == best_epoch(scores) > 0
