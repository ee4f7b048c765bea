"""PAG's summaries kept between jobs (issue 29): written once per (user, starting model, items
read), kept in the home's cache by the driver, reused by a later job on the same starting model,
and written again for another one (in-process driver, tiny random-weight model)."""

from __future__ import annotations

import shutil

from cbpo_orch.home import SAMPLE_DATA
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.orchestrator.driver import run_job
from cbpo_orch.orchestrator.forget import forget_user
from cbpo_orch.orchestrator.spec import JobSpec, Resources
from cbpo_orch.orchestrator.workspace import Workspace
from cbpo_orch.storage.summary_cache import SummaryCache, forget_user_summaries, summary_key
from cbpo_orch.workers import profile_summary
from tests.in_process import sample_users, without_ray

PAG = TrainConfig(method="pag", max_profile=8, max_new_tokens=8, max_prompt_tokens=320, eval_items=2)


def test_a_later_job_on_the_same_starting_model_reuses_each_users_summary_and_another_model_writes_its_own(tmp_path, tiny_model_dir, monkeypatch):
    without_ray(monkeypatch)
    written = []
    real = profile_summary.generate
    monkeypatch.setattr(profile_summary, "generate", lambda model, tokenizer, prompts, *rest, **kw: written.extend(prompts) or real(model, tokenizer, prompts, *rest, **kw))
    space = Workspace.open(tmp_path / "home", writes=True)
    users = sample_users()[:2]

    def pag_job(model, users=users) -> dict[str, dict]:
        spec = JobSpec(task="lamp4", data=str(SAMPLE_DATA), split="dev", model=str(model), methods=("pag",), users=tuple(users), train=PAG)
        job = space.registry.create_job("lamp4", ["pag"], list(users), spec.to_config(Resources(workers=1)))
        assert run_job(space, job) == "succeeded"
        extras = space.registry.extras(job)
        return {user: extras[(user, "pag")]["prompting"] for user in users}

    first = pag_job(tiny_model_dir)
    assert len(written) == 2 and not any(p["summary_cached"] for p in first.values()) and all(p["summary"] for p in first.values())
    second = pag_job(tiny_model_dir)
    assert len(written) == 2, "the second job writes no summary"
    assert second == {user: {**p, "summary_cached": True} for user, p in first.items()}

    third = pag_job(shutil.copytree(tiny_model_dir, tmp_path / "another-model"), users[:1])  # another folder: another starting model
    assert len(written) == 3 and not third[users[0]]["summary_cached"]

    assert forget_user(space, users[0]).summary_caches == 2, "forget removes the user's summaries of both starting models"
    assert [folder.name for folder in (space.cache / "summary").iterdir() if SummaryCache(folder).load({users[0]})] == []
    assert pag_job(tiny_model_dir, users[1:])[users[1]]["summary_cached"] and len(written) == 3, "the other user's stays"


def test_the_cache_finds_a_users_summaries_by_key_and_forgets_a_user_under_every_starting_model(tmp_path):
    root = tmp_path / "summary"
    key = summary_key("Here are texts one user wrote…", 96)
    assert key != summary_key("Here are texts one user wrote…", 64) != summary_key("Here are other texts…", 96)
    for model in ("model-a", "model-b"):
        SummaryCache(root / model).keep("u/1", key, {"summary": f"by {model}", "summary_items": 3, "summary_finish": "stop"})
        SummaryCache(root / model).keep("u2", key + "0", {"summary": "another user", "summary_items": 1, "summary_finish": "stop"})
    assert SummaryCache(root / "model-a").load({"u/1"}) == {key: {"summary": "by model-a", "summary_items": 3, "summary_finish": "stop"}}
    assert SummaryCache(root / "model-c").load({"u/1"}) == {}
    assert forget_user_summaries(root, "u/1") == 2
    assert SummaryCache(root / "model-b").load({"u/1", "u2"}) == {key + "0": {"summary": "another user", "summary_items": 1, "summary_finish": "stop"}}
