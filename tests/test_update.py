"""``cbpo-orch update``: a job on data v1, then v2 where one user gained items, one is new and
two are unchanged. The driver runs in this process without Ray (``tests/in_process.py``) on
the tiny random model; the CLI's own lines are checked through typer's runner."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cbpo_orch.storage.artifacts import directory_sha256
from tests.in_process import TRAIN, finished_job, without_ray, write_data

@pytest.fixture
def lifecycle(tmp_path, tiny_model_dir, monkeypatch):
    """A finished sft job on data v1, and v2 (``in_process.finished_job``)."""
    without_ray(monkeypatch)
    return finished_job(tmp_path, tiny_model_dir)


class Counting:
    """The worker function, counting the users it trains."""

    def __init__(self):
        self.users: list[str] = []

    def __call__(self, context, user_ids, config):
        from cbpo_orch.workers.personalize import personalize_users

        self.users += user_ids
        return personalize_users(context, user_ids, config)


def test_a_job_records_each_runs_data_fingerprint(lifecycle):
    from cbpo_orch.data.dataset import load_split
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.orchestrator.fingerprint import user_fingerprint

    space, job, users, v1, _ = lifecycle
    dataset = load_split(str(v1), "dev", load_task("lamp4"))
    for run in space.registry.runs(job):
        assert (run.data_fingerprint, run.n_items) == user_fingerprint(dataset, run.user_id, 4)
        assert run.n_items == 4 and run.source_run_id is None
    assert len({run.data_fingerprint for run in space.registry.runs(job)}) == 4


def test_update_trains_only_the_new_and_the_changed_user_and_carries_the_rest_by_reference(tmp_path, tiny_model_dir, monkeypatch, db_url):
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.update import start_update

    without_ray(monkeypatch)
    space, job, users, _, v2 = finished_job(tmp_path, tiny_model_dir, db=db_url)
    before = {row["user_id"]: row for row in space.registry.results(job)}
    update, plan, _ = start_update(space, job, str(v2))
    assert (plan.new, plan.changed, sorted(plan.unchanged)) == ([users[4]], [users[0]], sorted(users[1:4]))
    worker = Counting()
    assert run_job(space, update, worker_fn=worker) == "succeeded"

    assert sorted(worker.users) == sorted([users[0], users[4]])  # exactly 2 runs trained
    runs = {run.user_id: run for run in space.registry.runs(update)}
    after = {row["user_id"]: row for row in space.registry.results(update)}
    assert sorted(after) == sorted(users[:5])
    for user in users[1:4]:  # unchanged: the same folder, the same bytes, nothing written
        assert runs[user].attempts == 0 and runs[user].source_run_id is not None
        assert after[user]["adapter_path"] == before[user]["adapter_path"]
        assert directory_sha256(after[user]["adapter_path"]) == before[user]["sha256"] == after[user]["sha256"]
        assert after[user]["rouge1"] == before[user]["rouge1"]
    written = sorted(p.name for p in (space.artifacts.root / "adapters" / update).iterdir())
    assert written == sorted([users[0], users[4]])
    assert after[users[0]]["adapter_path"] != before[users[0]]["adapter_path"]

    versions = {(row["user_id"], row["version"]): row for row in space.registry.versions(update)}
    assert sorted(versions) == sorted([(u, 1) for u in users[:5]] + [(users[0], 2)])
    changed = versions[(users[0], 2)]
    assert (changed["job_id"], changed["parent"], changed["state"], changed["n_items"]) == (update, 1, "current", 4)
    assert changed["data_fingerprint"] == runs[users[0]].data_fingerprint != versions[(users[0], 1)]["data_fingerprint"]
    assert versions[(users[0], 1)]["state"] == "superseded"
    new = versions[(users[4], 1)]
    assert (new["job_id"], new["parent"], new["state"]) == (update, None, "current")
    assert all(versions[(u, 1)]["job_id"] == job and versions[(u, 1)]["state"] == "current" for u in users[1:4])
    assert space.registry.job(update).line_id == job and space.registry.job(update).parent_job_id == job

    again, plan, _ = start_update(space, update, str(v2))  # nothing changed since
    assert again is None and plan.trains == 0 and len(plan.unchanged) == 5


class CrashOnce:
    """Trains as usual, but the process "dies" (KeyboardInterrupt, as Ctrl-C or a kill
    leaves the run running) when it reaches ``user`` the first time."""

    def __init__(self, user: str):
        self.user, self.crashed = user, False

    def __call__(self, context, user_ids, config):
        from cbpo_orch.workers.personalize import personalize_users

        if self.user in user_ids and not self.crashed:
            self.crashed = True
            raise KeyboardInterrupt
        return personalize_users(context, user_ids, config)


def test_an_update_that_crashes_midway_resumes_like_a_job(lifecycle):
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.update import NotUpdatable, start_update

    space, job, users, _, v2 = lifecycle
    update, _, _ = start_update(space, job, str(v2))
    crash = CrashOnce(users[4])
    with pytest.raises(KeyboardInterrupt):
        run_job(space, update, worker_fn=crash)
    assert space.registry.job(update).state == "interrupted"
    with pytest.raises(NotUpdatable, match="resume"):
        start_update(space, update, str(v2))
    worker = Counting()
    assert run_job(space, update, worker_fn=worker) == "succeeded"  # what `cbpo-orch resume` runs
    assert users[4] in worker.users and set(worker.users) <= {users[0], users[4]}
    succeeded = [run for run in space.registry.runs(update) if run.source_run_id is None]
    assert sorted(run.user_id for run in succeeded) == sorted([users[0], users[4]])
    assert all(run.state == "succeeded" for run in succeeded)
    versions = space.registry.versions(update)
    assert sorted((row["user_id"], row["version"]) for row in versions if row["job_id"] == update) == sorted([(users[0], 2), (users[4], 1)])


def cbpo(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run the ``cbpo-orch`` entry point in this process: (exit code, stdout, stderr)."""
    from cbpo_orch.cli.main import main

    monkeypatch.setattr(sys, "argv", ["cbpo-orch", *args])
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    return exited.value.code or 0, out, err


def test_the_update_command_says_what_it_trains_and_refuses_mistakes_in_one_line(lifecycle, monkeypatch, capsys):
    from cbpo_orch.cli import lifecycle_commands
    from cbpo_orch.orchestrator.driver import run_job

    space, job, users, _, v2 = lifecycle
    home = space.artifacts.root.parent
    monkeypatch.setattr(lifecycle_commands, "run_watched", lambda space, job_id, resources: run_job(space, job_id))
    monkeypatch.setenv("CBPO_ORCH_HOME", str(home))
    code, out, err = cbpo(monkeypatch, capsys, "update", job, "--data", str(v2))
    assert code == 0, err
    assert f"update of job {job}: 1 new, 1 changed, 3 unchanged users: 2 runs to train, 3 carried over" in err
    assert f"{users[0]} · sft: v2 current, score 0.0000 against v1 (0.0000)" in err and f"{users[4]} · sft: v1 current" in err
    update = out.strip()
    assert space.registry.job(update).parent_job_id == job
    for args, expected in [
        (["update", job, "--data", str(v2), "--promote", "sometimes"], "error: --promote must be one of check, always"),
        (["update", "nosuchjob", "--data", str(v2)], "error: no job with id 'nosuchjob'"),
        (["update", job, "--data", str(home / "missing")], "error: "),
        (["update", update, "--data", str(v2), "--users", "nosuchuser"], "error: --users names 1 id(s) not in split"),
    ]:
        code, out, err = cbpo(monkeypatch, capsys, *args)
        assert code == 2 and err.startswith(expected) and len(err.strip().splitlines()) == 1, err
    code, out, err = cbpo(monkeypatch, capsys, "update", update, "--data", str(v2))
    assert code == 0 and "5 unchanged users: 0 runs to train" in err and "nothing to train: no job made" in err and out == ""


class Rigged:
    """Trains and scores as usual, but records ``scores[user]`` as the user's ROUGE and
    ``incumbents[user]`` as its current adapter's, on the same items, where its worker scored
    one: a rigged evaluation, so that a version is deliberately better or worse than the one it
    is compared with. ``measured``: the current adapters' scores the worker measured, by user."""

    def __init__(self, scores: dict[str, float], incumbents: dict[str, float] | None = None):
        self.scores, self.incumbents = scores, incumbents or {}
        self.measured: dict[str, float | None] = {}

    def __call__(self, context, user_ids, config):
        from cbpo_orch.workers.personalize import personalize_users

        outcomes = personalize_users(context, user_ids, config)
        for outcome in outcomes:
            if (outcome.user_id, config.method) in context.incumbents:
                self.measured[outcome.user_id] = outcome.incumbent_rouge1
                outcome.incumbent_rouge1 = self.incumbents[outcome.user_id]
            outcome.metrics.update(rouge1=self.scores[outcome.user_id], rougeL=self.scores[outcome.user_id])
        return outcomes


def test_promotion_compares_the_current_version_scored_on_the_new_items_not_its_recorded_score(lifecycle, tmp_path, monkeypatch, capsys):
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.update import start_update

    space, job, users, _, v2 = lifecycle
    changed, other, new = users[0], users[1], users[4]
    closer = write_data(tmp_path / "v1b", users[:4], {changed: 1, other: 1})  # each one item short of v2
    better, _, _ = start_update(space, job, str(closer), promote="always")
    always = Rigged({changed: 0.1, other: 0.6})
    assert run_job(space, better, worker_fn=always) == "succeeded"
    assert always.measured == {}  # --promote always scores no current adapter
    check = Rigged({changed: 0.3, other: 0.3, new: 0.3}, incumbents={changed: 0.4, other: 0.2})
    worse, _, _ = start_update(space, better, str(v2))
    assert run_job(space, worse, worker_fn=check) == "succeeded"
    assert sorted(check.measured) == sorted([changed, other]) and all(isinstance(score, float) for score in check.measured.values())
    states = {(row["user_id"], row["version"]): (row["state"], row["score"], row["parent_score"]) for row in space.registry.versions(worse)}
    assert states[(changed, 1)] == ("superseded", 0.0, None)
    assert states[(changed, 2)] == ("current", 0.1, None)  # under `always` nothing was compared
    assert states[(changed, 3)] == ("rejected", 0.3, 0.4)  # above v2's recorded 0.1, below v2 on the same items
    assert states[(other, 2)] == ("superseded", 0.6, None)
    assert states[(other, 3)] == ("current", 0.3, 0.2)  # below v2's recorded 0.6, above v2 on the same items
    assert states[(new, 1)] == ("current", 0.3, None)  # a new user has nothing to be compared with
    shown = {row["user_id"]: row for row in space.registry.results(worse)}
    assert shown[changed]["rouge1"] == 0.3  # the job's own result, though its version was rejected

    monkeypatch.setenv("CBPO_ORCH_HOME", str(space.artifacts.root.parent))
    code, out, _ = cbpo(monkeypatch, capsys, "status", worse)
    assert code == 0 and f"update of job {better} in the line of job {job} (promote: check)" in out
    assert "adapter versions this job trained: 2 current, 1 rejected" in out
    code, out, _ = cbpo(monkeypatch, capsys, "results", worse, "--versions", "--format", "json")
    assert code == 0 and [(r["user_id"], r["version"], r["state"], r["parent_score"]) for r in json.loads(out) if r["user_id"] == changed] == [
        (changed, 1, "superseded", None), (changed, 2, "current", None), (changed, 3, "rejected", 0.4)]
    code, out, _ = cbpo(monkeypatch, capsys, "rollback", changed, "--job", worse)
    assert code == 0 and out.strip() == f"{changed} · sft: v1 current again (v2 rolled back)"
    assert [(r["version"], r["state"]) for r in space.registry.versions(job, changed)] == [(1, "current"), (2, "rolled-back"), (3, "rejected")]
    code, _, err = cbpo(monkeypatch, capsys, "rollback", changed, "--job", worse)
    assert code == 2 and err.startswith(f"error: user {changed!r} has no current version with an earlier one")


NEW_TOKENS = 16
"""Long enough answers for the tiny untied model to score above 0 on the sample's first user."""


def _rouge1_on(adapter: str, model_dir, data, user: str, asked: list[dict]) -> float:
    """ROUGE-1 of the peft adapter folder ``adapter`` over the model in ``model_dir``, on the
    items ``asked`` (a run's predictions.jsonl rows) of ``user`` in ``data``, as a job on the
    tiny model answers them (TRAIN's prompt budget, ``NEW_TOKENS``, the task's decoding)."""
    from peft import PeftModel

    from cbpo_orch.data.dataset import load_split
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.training.evaluation import rouge
    from cbpo_orch.training.generation import generate
    from cbpo_orch.training.models import load_model

    task = load_task("lamp4")
    dataset = load_split(str(data), "dev", task)
    queries = {q.id: task.prompt(q) for q in dataset.user(user).queries}
    items = {e.item_id: e.x for e in dataset.examples(user)}
    prompts = [items[a["id"]] if a["eval_item"] else queries[a["id"]] for a in asked]
    loaded = load_model(model_dir, "cpu")
    model = PeftModel.from_pretrained(loaded.model, adapter)
    budgets = task.budgets(TRAIN["max_prompt_tokens"], NEW_TOKENS)
    answers = generate(model, loaded.tokenizer, prompts, budgets, 16, "cpu", decoding=task.decoding)
    scored = [(out.text, a["gold"]) for out, a in zip(answers, asked) if a["gold"] is not None]
    return rouge([text for text, _ in scored], [gold for _, gold in scored])["rouge1"]


def _asked(adapter_path: str) -> list[dict]:
    return [json.loads(line) for line in (Path(adapter_path) / "predictions.jsonl").read_text().splitlines()]


def test_the_current_adapter_is_scored_on_the_new_items_and_promote_always_scores_nothing_more(tmp_path, monkeypatch):
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.update import start_update
    from cbpo_orch.workers import personalize
    from tests.tiny_model import build_tiny_model

    without_ray(monkeypatch)
    model = build_tiny_model(tmp_path / "tiny-untied", tie_embeddings=False)  # answers in words, some of them the golds'
    # its 3 newest items are scored: in v2, the 3 that v1 lacked
    space, job, users, _, v2 = finished_job(tmp_path, model, max_profile=6, eval_items=3, max_new_tokens=NEW_TOKENS)
    prompts: list[str] = []
    real = personalize.generate
    monkeypatch.setattr(personalize, "generate", lambda model, tokenizer, texts, *rest, **options: prompts.extend(texts) or real(model, tokenizer, texts, *rest, **options))
    changed = users[0]

    checked, _, _ = start_update(space, job, str(v2), users=changed)  # the changed user only
    assert run_job(space, checked) == "succeeded"
    versions = {(row["user_id"], row["version"]): row for row in space.registry.versions(checked)}
    current, trained = versions[(changed, 1)], versions[(changed, 2)]
    asked = _asked(trained["adapter_path"])
    assert any(a["eval_item"] for a in asked)
    expected = _rouge1_on(current["adapter_path"], model, v2, changed, asked)
    assert expected > 0 and trained["parent_score"] == pytest.approx(expected, abs=1e-12)
    assert trained["parent_score"] != current["score"]  # v1 on v2's items, not on its own
    assert len(prompts) == 2 * len(asked)  # the current adapter answered the same prompts

    prompts.clear()
    shorter = write_data(tmp_path / "v3", users[:5], {changed: 1})
    always, _, _ = start_update(space, checked, str(shorter), users=changed, promote="always")
    assert run_job(space, always) == "succeeded"
    latest = space.registry.versions(always, changed)[-1]
    assert (latest["job_id"], latest["state"], latest["parent_score"]) == (always, "current", None)
    assert len(prompts) == len(_asked(latest["adapter_path"]))  # its own answers only


def test_an_update_starts_from_the_task_adapter_the_job_started_from(lifecycle):
    from dataclasses import replace

    from cbpo_orch.orchestrator.job_model import task_adapter_key
    from cbpo_orch.orchestrator.spec import JobSpec
    from cbpo_orch.orchestrator.update import start_update

    space, submitted, _, _, v2 = lifecycle
    registry = space.registry
    spec, resources = JobSpec.from_config(registry.job(submitted).config)
    auto = replace(spec, task_adapter="auto")
    job = registry.create_job("lamp4", ["sft"], list(auto.users), auto.to_config(resources))
    registry.record_task_adapter(task_adapter_key(auto), "lamp4", auto.model, "/tam/of/the/job", "ab" * 32, 1)
    registry.set_job_state(job, "failed")  # as if its runs had run: they are all retrained
    update, _, _ = start_update(space, job, str(v2))
    assert JobSpec.from_config(registry.job(update).config)[0].task_adapter == "/tam/of/the/job"  # not an `auto` on v2's train split
