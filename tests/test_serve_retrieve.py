"""A --retrieve job served (issue 29): a request of one of its users is composed as the server
composes it (the catalog's retrieval, ``served_context`` and ``served_prompt``, as the ingress
calls them) and answered by the user's adapter with the prediction its run recorded. The job
runs through the in-process driver (its prompt pass and π_ref pass included) on the tiny
untied random-weight model."""

from __future__ import annotations

import json
from pathlib import Path

from cbpo_orch.data.records import Query
from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.orchestrator.driver import run_job
from cbpo_orch.orchestrator.spec import JobSpec, Resources
from cbpo_orch.orchestrator.workspace import Workspace
from tests.in_process import without_ray


def test_a_served_request_of_a_retrieve_jobs_user_gets_its_recorded_prediction(home, dev_users, tmp_path, monkeypatch):
    from cbpo_orch.serving.catalog import load_catalog
    from cbpo_orch.serving.generator import BatchedGenerator, Row, load_user_adapter
    from cbpo_orch.serving.retrieval import served_context
    from cbpo_orch.training.encoding import prompt_ids
    from cbpo_orch.training.task_adapter import starting_model
    from cbpo_orch.workers.prompts import served_prompt
    from tests.tiny_model import build_tiny_model

    without_ray(monkeypatch)
    model = build_tiny_model(tmp_path / "tiny-untied", seed=2, tie_embeddings=False)
    users = dev_users[:2]
    train = TrainConfig(method="cbpo", retrieve=2, max_profile=8, epochs=1, lr=3e-2, max_new_tokens=8, max_prompt_tokens=384, eval_items=2)
    spec = JobSpec(task="lamp4", data=str(SAMPLE_DATA), split="dev", model=str(model), methods=("cbpo",), users=tuple(users), train=train)
    space = Workspace.open(home, writes=True)
    job = space.registry.create_job("lamp4", ["cbpo"], users, spec.to_config(Resources(workers=1)))
    assert run_job(space, job) == "succeeded"

    catalog = load_catalog(space, job, "cbpo")
    assert catalog.retrieval is not None and catalog.retrieval.config.retrieve == 2
    loaded = starting_model(catalog.model_path, catalog.task_adapter, "cpu")
    served = served_context(catalog.retrieval, catalog.task, loaded.tokenizer, catalog.model_path)
    generator = BatchedGenerator(loaded, catalog.lora, max_rows=4, decoding=catalog.task.decoding)
    rows = {row["user_id"]: row for row in space.registry.results(job)}
    answered = 0
    for user in users:
        adapter = load_user_adapter(user, catalog.adapter(user).adapter_path, catalog.lora, "cpu")
        recorded = {p["id"]: p for line in (Path(rows[user]["adapter_path"]) / "predictions.jsonl").read_text().splitlines() if not (p := json.loads(line))["eval_item"]}
        for query in served.dataset.user(user).queries:
            request = catalog.task.prompt(Query(id="request", input=query.input, gold=None))
            prompt = served_prompt(served, user, request, catalog.retrieval.config, catalog.budgets)
            assert prompt.endswith(request) and prompt != request, "the request carries the user's retrieved items"
            [answer] = generator.generate([Row(prompt_ids(loaded.tokenizer, prompt, catalog.budgets.prompt_tokens), catalog.budgets.new_tokens, adapter)])
            assert answer.text == recorded[query.id]["prediction"]
            answered += 1
    assert answered >= len(users)
