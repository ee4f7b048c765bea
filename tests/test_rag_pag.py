"""The RAG and PAG baselines (issue 29): the starting model, untrained, answering each prompt
after the user's retrieved older items (rag) or after its own summary of the user (pag)."""

from __future__ import annotations

import json

import pytest
import torch

from cbpo_orch.data.retrieval import render_items, with_context
from cbpo_orch.data.tasks import NO_REPEAT_NGRAM, Budgets, Decoding, load_task
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.training.generation import generate
from cbpo_orch.training.models import load_model
from cbpo_orch.workers.personalize import personalize_user
from cbpo_orch.workers.user_context import UserContext
from cbpo_orch.workers.profile_summary import SUMMARY_INSTRUCTION, SUMMARY_LABEL
from tests.helpers import Cli, ok_line, sqlite_registry

BUDGETS = dict(max_profile=16, max_prompt_tokens=384, max_new_tokens=8, eval_items=3)


@pytest.fixture(scope="module")
def context(sample_history, tmp_path_factory) -> UserContext:
    """The tiny model with untied embeddings: its outputs are words, so texts can be compared."""
    from tests.tiny_model import build_tiny_model

    dataset, history = sample_history
    loaded = load_model(build_tiny_model(tmp_path_factory.mktemp("tiny-untied"), tie_embeddings=False), "cpu")
    return UserContext(task=load_task("lamp4"), dataset=dataset, history=history, loaded=loaded)


def _again(context: UserContext, prompts: list[str], budgets: Budgets) -> list[str]:
    completions = generate(context.loaded.model, context.loaded.tokenizer, prompts, budgets, 16, torch.device("cpu"), decoding=context.task.decoding)
    return [c.text for c in completions]


def _asked_prompts(context: UserContext, user_id: str) -> list[str]:
    queries = [context.task.prompt(q) for q in context.dataset.user(user_id).queries]
    return queries + [e.x for e in context.dataset.examples(user_id, 16)[-3:]]


def test_rag_answers_each_prompt_after_the_users_own_older_items_and_trains_nothing(context):
    user_id = next(iter(context.dataset.users))
    outcome = personalize_user(context, user_id, TrainConfig(method="rag", **BUDGETS))
    items = context.dataset.examples(user_id, 16)
    ids = [e.item_id for e in items]
    assert outcome.adapter_files is None and outcome.metrics["losses"] == []
    assert outcome.metrics["prompting"] == {"retrieve": 4, "retriever": "embedding"}

    prompts = []
    for prediction, bare in zip(outcome.predictions, _asked_prompts(context, user_id)):
        carried = prediction["context_items"]
        before = ids.index(prediction["id"]) if prediction["eval_item"] else len(ids)
        assert 1 <= len(carried) <= 4 and all(ids.index(item) < before for item in carried)
        prompts.append(with_context(render_items([items[ids.index(item)] for item in carried]), bare))
    assert [p["prediction"] for p in outcome.predictions] == _again(context, prompts, context.task.budgets(384, 8))


def test_pag_writes_one_summary_of_the_users_older_items_and_puts_it_before_each_prompt(context):
    user_id = next(iter(context.dataset.users))
    outcome = personalize_user(context, user_id, TrainConfig(method="pag", **BUDGETS))
    prompting = outcome.metrics["prompting"]
    trainable = context.dataset.examples(user_id, 16)[:-3]  # the summary never reads an evaluation item
    assert outcome.adapter_files is None and 1 <= prompting["summary_items"] <= len(trainable)

    read = SUMMARY_INSTRUCTION.format(items=render_items(trainable[len(trainable) - prompting["summary_items"] :]))
    [summary] = generate(context.loaded.model, context.loaded.tokenizer, [read], Budgets(392 - 96, 96), 1, torch.device("cpu"), decoding=Decoding(no_repeat_ngram=NO_REPEAT_NGRAM))
    assert prompting["summary"] == summary.text != ""
    assert prompting["summary_finish"] == summary.finish_reason

    label = SUMMARY_LABEL.format(summary=summary.text)
    prompts = [with_context(label, bare) for bare in _asked_prompts(context, user_id)]
    assert [p["prediction"] for p in outcome.predictions] == _again(context, prompts, context.task.budgets(384, 8))
    assert "context_items" not in outcome.predictions[0]


def test_pag_reuses_a_summary_the_job_found_for_the_same_items_and_writes_one_for_other_items(context, monkeypatch):
    """A summary in ``context.summaries`` (the cache's, found by the driver) under the key of
    the instruction the user's items make is put before the prompts as it is, nothing
    generated; items that make another instruction get a summary of their own."""
    from dataclasses import replace

    from cbpo_orch.workers import profile_summary

    user_id = next(iter(context.dataset.users))
    config = TrainConfig(method="pag", **BUDGETS)
    first = personalize_user(context, user_id, config).metrics["prompting"]
    assert first["summary_cached"] is False and first["summary_key"]

    asked = []
    real = profile_summary.generate
    monkeypatch.setattr(profile_summary, "generate", lambda model, tokenizer, prompts, *rest, **kw: asked.append(prompts) or real(model, tokenizer, prompts, *rest, **kw))
    cached = replace(context, summaries={first["summary_key"]: {"summary": "Writes about food.", "summary_items": first["summary_items"], "summary_finish": "stop"}})
    again = personalize_user(cached, user_id, config)
    assert asked == [], "a cached summary is not written again"
    assert again.metrics["prompting"] == {**first, "summary": "Writes about food.", "summary_finish": "stop", "summary_cached": True}
    label = SUMMARY_LABEL.format(summary="Writes about food.")
    prompts = [with_context(label, bare) for bare in _asked_prompts(context, user_id)]
    assert [p["prediction"] for p in again.predictions] == _again(context, prompts, context.task.budgets(384, 8))

    other = personalize_user(cached, user_id, replace(config, eval_items=4)).metrics["prompting"]
    assert len(asked) == 1 and other["summary_cached"] is False and other["summary_key"] != first["summary_key"], "other items read, another summary"


def test_an_arm_trained_with_retrieve_trains_and_answers_on_prompts_carrying_only_older_items(context, monkeypatch, tmp_path):
    """sft --retrieve 2: each item it trains on carries items older than it only (the first
    none), never an evaluation item; its queries and evaluation items carry the items that
    rag would retrieve, and the saved adapter answers those prompts with the recorded predictions."""
    from peft import PeftModel

    from cbpo_orch.workers import personalize

    encoded = []
    real = personalize.encode_samples
    monkeypatch.setattr(personalize, "encode_samples", lambda tokenizer, pairs, positive, budgets: encoded.append(pairs) or real(tokenizer, pairs, positive, budgets))
    user_id = next(iter(context.dataset.users))
    outcome = personalize_user(context, user_id, TrainConfig(method="sft", retrieve=2, epochs=1, lr=5e-3, **BUDGETS))
    items = context.dataset.examples(user_id, 16)
    trained = encoded[0]
    assert [y for _, y in trained] == [e.y for e in items[:-3]]
    assert trained[0][0] == items[0].x
    for i, (x, _) in enumerate(trained):
        carried = [e for e in items if f"{e.x}\n{e.y}" in x]
        assert x.endswith(items[i].x) and carried == [e for e in items[:i] if e in carried]
        assert i < 2 or 1 <= len(carried) <= 2

    rag = personalize_user(context, user_id, TrainConfig(method="rag", retrieve=2, **BUDGETS))
    assert [p["context_items"] for p in outcome.predictions] == [p["context_items"] for p in rag.predictions]
    assert outcome.metrics["prompting"] == {"retrieve": 2, "retriever": "embedding"}
    for name, content in outcome.adapter_files.items():
        (tmp_path / name).write_bytes(content)
    reloaded = PeftModel.from_pretrained(load_model(context.loaded.path, "cpu").model, str(tmp_path))
    ids = [e.item_id for e in items]
    prompts = [with_context(render_items([items[ids.index(i)] for i in p["context_items"]]), bare)
               for p, bare in zip(outcome.predictions, _asked_prompts(context, user_id))]
    again = generate(reloaded, context.loaded.tokenizer, prompts, context.task.budgets(384, 8), 16, torch.device("cpu"), decoding=context.task.decoding)
    assert [c.text for c in again] == [p["prediction"] for p in outcome.predictions]


def test_the_server_composes_a_retrieve_jobs_request_as_evaluation_composed_the_users_queries(context, tmp_path):
    """A request of a --retrieve job's user is prompted with the items its queries carried in
    evaluation (``context_items``), read from the job's split and history index."""
    from cbpo_orch.serving.catalog import ServedRetrieval
    from cbpo_orch.serving.retrieval import served_context
    from cbpo_orch.workers.prompts import served_prompt

    user_id = next(iter(context.dataset.users))
    config = TrainConfig(method="sft", retrieve=2, **BUDGETS)
    recorded = personalize_user(context, user_id, TrainConfig(method="rag", retrieve=2, **BUDGETS)).predictions
    context.history.save(tmp_path / "history")
    retrieval = ServedRetrieval(context.dataset.path, "dev", str(tmp_path / "history"), None, config)
    served = served_context(retrieval, context.task, context.loaded.tokenizer, context.loaded.path)
    items = {e.item_id: e for e in context.dataset.examples(user_id, 16)}
    for query, prediction in zip(context.dataset.user(user_id).queries, recorded):
        expected = with_context(render_items([items[i] for i in prediction["context_items"]]), context.task.prompt(query))
        assert served_prompt(served, user_id, context.task.prompt(query), config, context.task.budgets(384, 8)) == expected


def test_submit_runs_base_rag_pag_sft_and_cbpo_end_to_end_on_the_sample(home, tiny_model_dir, dev_users):
    """``cbpo-orch submit --method base,rag,pag,sft,cbpo``: every run succeeds; rag and pag
    train nothing and record how they prompted (rag: k, the retriever and each prediction's
    items; pag: the summary), the other arms record nothing of the kind."""
    methods = ("base", "rag", "pag", "sft", "cbpo")
    cli = Cli(home)
    try:
        submitted = cli.run("submit", "--model", str(tiny_model_dir), "--users", "2", "--method", ",".join(methods), "--workers", "1",
                            "--max-profile", "8", "--epochs", "1", "--max-new-tokens", "8", "--max-prompt-tokens", "384", "--eval-items", "2")
        job = ok_line(submitted)
        rows = json.loads(cli.run("results", job, "--format", "json").stdout)
    finally:
        cli.cleanup()
    assert sorted((row["user_id"], row["method"]) for row in rows) == sorted((u, m) for u in dev_users[:2] for m in methods)
    with sqlite_registry(home) as registry:
        assert registry.job(job).state == "succeeded"
        extras = registry.extras(job)
    for row in rows:
        extra, method = extras[(row["user_id"], row["method"])], row["method"]
        assert (row["adapter_path"] is None) == (method in ("base", "rag", "pag"))
        pag_record = {"summary", "summary_items", "summary_finish", "summary_key", "summary_cached"}
        assert set(extra["prompting"]) == {"rag": {"retrieve", "retriever"}, "pag": pag_record}.get(method, set())
        assert all(("context_items" in p) == (method == "rag") for p in extra["predictions"])
    assert extras[(dev_users[0], "rag")]["prompting"] == {"retrieve": 4, "retriever": "embedding"}
    assert all(p["context_items"] for p in extras[(dev_users[0], "rag")]["predictions"])
    assert extras[(dev_users[0], "pag")]["prompting"]["summary_items"] >= 1
