"""Do-no-harm epoch selection: the held-out slice, the choice of epoch, and the trainer
ending at the chosen epoch's weights (tiny random model)."""

from __future__ import annotations

import pytest
import torch

from cbpo_orch.method.config import TrainConfig
from cbpo_orch.method.models import load_model
from cbpo_orch.method.selection import best_epoch, holdout_size, split_holdout
from cbpo_orch.method.tasks import Budgets
from cbpo_orch.method.trainer import attached_adapter, encode_samples, train_adapter


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
    with attached_adapter(loaded.model, config.lora, config.seed) as peft_model:
        trainable = [p for p in peft_model.parameters() if p.requires_grad]
        seen, scores = [], iter([0.1, 0.2, 0.5, 0.3])

        def validate():
            seen.append([p.detach().clone() for p in trainable])
            return next(scores)

        result = train_adapter(peft_model, loaded.tokenizer, samples, torch.tensor([0.3]), config, loaded.device, validate=validate)
        assert result.selected_epoch == 2 and result.validation_scores == [0.1, 0.2, 0.5, 0.3]
        assert all(torch.equal(p, kept) for p, kept in zip(trainable, seen[2]))
        assert not all(torch.equal(p, last) for p, last in zip(trainable, seen[3]))
