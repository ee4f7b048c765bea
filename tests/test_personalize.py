"""End to end for one real HuffPost user: every method trains, scores, saves and reloads."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel

from cbpo_orch.data.tasks import load_task
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.method.methods import METHODS
from cbpo_orch.training.generation import generate
from cbpo_orch.training.models import load_model
from cbpo_orch.workers.personalize import personalize_user
from cbpo_orch.workers.user_context import UserContext

METRIC_KEYS = {"rouge1", "rougeL", "gamma", "gamma_reason", "n_pos", "n_aux", "selection", "train_seconds", "seconds", "phase_seconds", "method", "config", "losses", "user_id"}
FAST = dict(max_profile=16, max_prompt_tokens=128, max_new_tokens=12, batch_size=8, epochs=3, selection=False)


@pytest.fixture(scope="module", params=["tiny_model_dir", "commit_lm_dir"])
def context(request, sample_history) -> UserContext:
    dataset, history = sample_history
    loaded = load_model(request.getfixturevalue(request.param), "cpu")
    return UserContext(task=load_task("lamp4"), dataset=dataset, history=history, loaded=loaded)


def _lr(context: UserContext) -> float:
    return 5e-3 if "tiny" in str(context.loaded.path) else 2e-3


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_scores_and_reloads(context, method, tmp_path):
    user_id = next(iter(context.dataset.users))
    config = TrainConfig(method=method, lr=_lr(context), **FAST)
    outcome = personalize_user(context, user_id, config)

    metrics = outcome.metrics
    assert METRIC_KEYS <= metrics.keys()
    assert 0.0 <= metrics["rouge1"] <= 1.0 and 0.0 <= metrics["rougeL"] <= 1.0
    assert metrics["n_pos"] == 16
    assert metrics["n_aux"] == (16 if METHODS[method].uses_aux else 0)
    assert (metrics["gamma"] is not None) == method.startswith("cbpo")
    json.dumps(metrics)
    assert len(outcome.predictions) == len(context.dataset.user(user_id).queries)

    if not METHODS[method].trains:
        assert outcome.adapter_files is None and metrics["losses"] == []
        return
    losses = metrics["losses"]
    per_epoch = len(losses) // 3
    assert sum(losses[-per_epoch:]) < sum(losses[:per_epoch]), f"{method}: loss did not go down: {losses}"

    for name, content in outcome.adapter_files.items():
        (tmp_path / name).write_bytes(content)
    assert {"adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= set(outcome.adapter_files)
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    if method in ("bco", "cbpo", "cbpo-raw", "cbpo-nnpu"):
        assert state["reference_state"]["n_users"] == 1

    base = load_model(context.loaded.path, "cpu").model
    reloaded = PeftModel.from_pretrained(base, str(tmp_path))
    prompts = [context.task.prompt(q) for q in context.dataset.user(user_id).queries]
    again = generate(reloaded, context.loaded.tokenizer, prompts, context.task.budgets(128, 12), 16, torch.device("cpu"), decoding=context.task.decoding)
    assert [a.text for a in again] == [p["prediction"] for p in outcome.predictions]


def test_same_seed_same_adapter(context):
    user_id = next(iter(context.dataset.users))
    config = TrainConfig(method="cbpo", lr=_lr(context), **{**FAST, "epochs": 1})
    first = personalize_user(context, user_id, config)
    second = personalize_user(context, user_id, config)
    assert first.metrics["losses"] == second.metrics["losses"]
    assert first.adapter_files["adapter_model.safetensors"] == second.adapter_files["adapter_model.safetensors"]


def test_methods_share_aux_samples(context, monkeypatch):
    """Every method of a user sees the same auxiliary items (a fair comparison)."""
    from cbpo_orch.workers import personalize as module

    seen = {}
    original = module.encode_samples

    def spy(tokenizer, pairs, positive, budgets):
        if not positive:
            seen.setdefault(method, pairs)
        return original(tokenizer, pairs, positive, budgets)

    monkeypatch.setattr(module, "encode_samples", spy)
    user_id = next(iter(context.dataset.users))
    for method in ("kto", "bco", "cbpo"):
        personalize_user(context, user_id, TrainConfig(method=method, **{**FAST, "epochs": 1}))
    assert seen["kto"] == seen["bco"] == seen["cbpo"]


def test_base_model_is_untouched_after_training(context):
    """One loaded model serves user after user: training leaves its weights as they were."""
    before = {k: v.clone() for k, v in context.loaded.model.state_dict().items()}
    personalize_user(context, next(iter(context.dataset.users)), TrainConfig(method="sft", lr=_lr(context), **FAST))
    after = context.loaded.model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_selection_holds_out_the_most_recent_items_and_keeps_the_best_epoch(context):
    """Do no harm: 16 items → 4 most recent held out, 12 trained on; the starting model and
    each epoch are scored on the held-out items, and the best is what the user gets."""
    user_id = next(iter(context.dataset.users))
    outcome = personalize_user(context, user_id, TrainConfig(method="sft", lr=_lr(context), **{**FAST, "selection": True}))
    selection = outcome.metrics["selection"]
    assert outcome.metrics["n_pos"] == 12 and selection["n_held_out"] == 4
    scores = selection["validation_logp"]
    assert len(scores) == 1 + FAST["epochs"]
    assert selection["selected_epoch"] == max(range(len(scores)), key=lambda i: (scores[i], -i))
    state = json.loads(outcome.adapter_files["trainer_state.json"])
    assert state["selected_epoch"] == selection["selected_epoch"]


def test_selection_falls_back_to_the_starting_model_when_no_epoch_beats_it(context, monkeypatch):
    """When every epoch scores below the starting model, the adapter is the starting model:
    the user's outputs are exactly the base outputs."""
    from cbpo_orch.workers import personalize as module

    scores = iter([1.0, 0.5, 0.25, 0.125])
    monkeypatch.setattr(module, "_held_out_score", lambda *args: lambda: next(scores))
    user_id = next(iter(context.dataset.users))
    base = personalize_user(context, user_id, TrainConfig(method="base", **FAST))
    trained = personalize_user(context, user_id, TrainConfig(method="cbpo", lr=_lr(context), **{**FAST, "selection": True}))
    assert trained.metrics["selection"]["selected_epoch"] == 0
    assert [p["prediction"] for p in trained.predictions] == [p["prediction"] for p in base.predictions]


@pytest.mark.parametrize("slots", [3, 2])
def test_users_personalized_together_get_what_each_gets_alone(context, monkeypatch, slots):
    """personalize_users trains several users' adapters in the same passes; each user's
    γ, losses, chosen epoch and outputs are the ones it gets alone (LoRA dropout 0), also
    when the device holds fewer slots than the pack has users (a slot whose user ends takes
    the next, and the answers are given group by group)."""
    from cbpo_orch.method.config import LoraSettings
    from cbpo_orch.workers import personalize
    from cbpo_orch.workers.personalize import personalize_users

    monkeypatch.setattr(personalize, "pack_slots", lambda model, lora, works, *_: min(slots, len(works)))
    user_ids = list(context.dataset.users)[:3]
    config = TrainConfig(method="cbpo", lr=_lr(context), lora=LoraSettings(dropout=0.0), **{**FAST, "epochs": 2, "selection": True})
    together = personalize_users(context, user_ids, config)
    for user_id, packed in zip(user_ids, together):
        alone = personalize_user(context, user_id, config)
        assert packed.user_id == user_id and packed.metrics["gamma"] == alone.metrics["gamma"]
        assert packed.metrics["losses"] == pytest.approx(alone.metrics["losses"], rel=1e-4, abs=1e-6)
        assert packed.metrics["selection"]["selected_epoch"] == alone.metrics["selection"]["selected_epoch"]
        assert [p["prediction"] for p in packed.predictions] == [p["prediction"] for p in alone.predictions]


def test_evaluation_items_are_the_newest_never_trained_and_scored_with_the_queries(sample_history, tiny_model_dir):
    """--eval-items 4 of a 16-item profile: the 4 newest items are answered after the queries and
    scored with them (the mean over all), and training sees only the 12 older ones."""
    from cbpo_orch.training.evaluation import rouge

    dataset, history = sample_history
    context = UserContext(task=load_task("lamp4"), dataset=dataset, history=history, loaded=load_model(tiny_model_dir, "cpu"))
    user_id = next(iter(context.dataset.users))
    outcome = personalize_user(context, user_id, TrainConfig(method="sft", lr=_lr(context), **{**FAST, "eval_items": 4}))
    newest = context.dataset.examples(user_id, 16)[-4:]
    queries = context.dataset.user(user_id).queries
    assert outcome.metrics["n_pos"] == 12
    assert [p["id"] for p in outcome.predictions] == [q.id for q in queries] + [e.item_id for e in newest]
    assert [p["eval_item"] for p in outcome.predictions] == [False] * len(queries) + [True] * 4
    assert [p["gold"] for p in outcome.predictions[len(queries):]] == [e.y for e in newest]
    expected = rouge([p["prediction"] for p in outcome.predictions], [p["gold"] for p in outcome.predictions])
    assert outcome.metrics["rouge1"] == pytest.approx(expected["rouge1"])
    evaluation = outcome.metrics["evaluation"]
    assert evaluation["n_scored"] == len(queries) + 4 and evaluation["n_eval_items"] == 4
    assert evaluation["steps"] == len(outcome.metrics["losses"]) > 0
    assert evaluation["hit_budget"] == sum(p["finish_reason"] == "length" for p in outcome.predictions)
