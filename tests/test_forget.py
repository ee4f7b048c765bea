"""``cbpo-orch forget``: nothing of the user remains in the home (file names and contents:
adapters, predictions, caches, the SQLite registry's files) or in any registry row; its items
leave the cached aux pool; the runs of other users that drew them as aux are reported; the
audit line names the user only by a digest. Registry rows alone on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import sys

import pytest
from sqlalchemy import select

from cbpo_orch.storage.artifacts import directory_sha256
from cbpo_orch.storage.engine import transact
from cbpo_orch.storage.models import AuxSource, Base, UserRun
from cbpo_orch.storage.registry import Registry
from tests.in_process import finished_job, without_ray


def _rows_naming(registry: Registry, text: str) -> list[str]:
    """Every row of every registry table whose values mention ``text``."""

    def work(session):
        found = []
        for table in Base.metadata.sorted_tables:
            for row in session.execute(select(table)):
                if text in json.dumps([str(value) for value in row]):
                    found.append(f"{table.name}: {row}")
        return found

    return transact(registry._engine, work)


def _files_naming(root, needles: list[str]) -> list[str]:
    """Every file under ``root`` whose path or bytes hold one of ``needles``."""
    found = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        found += [f"{path}: {needle[:30]!r}" for needle in needles if needle in str(path) or needle.encode() in data]
    return found


def test_forget_leaves_nothing_of_the_user_and_names_whose_adapters_drew_on_its_items(tmp_path, tiny_model_dir, monkeypatch, capsys, db_url):
    from cbpo_orch.data.history import HistoryIndex
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.forget import subject_digest
    from cbpo_orch.orchestrator.update import start_update

    without_ray(monkeypatch)
    space, job, users, v1, v2 = finished_job(tmp_path, tiny_model_dir, ("cbpo",), db_url)
    update, _, _ = start_update(space, job, str(v2))
    assert run_job(space, update) == "succeeded"
    gone, home = users[0], space.artifacts.root.parent
    texts = [json.loads(line)["y"] for folder in (home / "cache" / "history").iterdir() for line in (folder / "examples.jsonl").open()
             if json.loads(line)["user_id"] == gone]
    assert texts and _files_naming(home, [gone] + texts) and _rows_naming(space.registry, gone)
    drew = transact(space.registry._engine, lambda s: sorted(set(s.execute(
        select(UserRun.user_id, UserRun.method, UserRun.job_id).join(AuxSource, AuxSource.run_id == UserRun.id).where(AuxSource.user_id == gone)
    ).all())))
    assert drew, "no other user drew the forgotten user's items as aux: the report would show nothing"
    kept = {row["user_id"]: row for row in space.registry.results(update) if row["user_id"] != gone}
    assert list((home / "cache" / "reference").iterdir())

    monkeypatch.setenv("CBPO_ORCH_HOME", str(home))
    monkeypatch.setenv("CBPO_ORCH_DB", db_url)
    monkeypatch.setattr(sys, "argv", ["cbpo-orch", "forget", gone])
    from cbpo_orch.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main()
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert out.startswith(f"forgot {gone}: 2 runs and 2 adapter versions in 2 jobs, 2 adapter folders, ")
    assert f"{len(drew)} runs of other users trained on its items as aux items" in out
    assert all(f"  {user} · {method} · job {job_id}" in out for user, method, job_id in drew)

    assert _files_naming(home, [gone] + texts) == []  # no file name or content: adapters, predictions, caches, a SQLite registry and its WAL
    assert _rows_naming(space.registry, gone) == []
    assert list((home / "cache" / "reference").iterdir()) == []  # the π_ref file held its pairs
    for folder in (home / "cache" / "history").iterdir():  # the aux pool of future training, without its items
        history = HistoryIndex.load(folder)
        assert gone not in history.index.owners and len(history.embeddings) == len(history.examples) == len(history.index)
    after = {row["user_id"]: row for row in space.registry.results(update)}
    assert after == kept and all(directory_sha256(row["adapter_path"]) == row["sha256"] for row in after.values())
    [line] = space.registry.audit_log()
    assert (line["action"], line["subject"]) == ("forget", subject_digest(gone)) and line["actor"]
    assert line["detail"]["runs"] == 2 and line["detail"]["job_ids"] == sorted([job, update])
    assert gone not in json.dumps(line)
    with pytest.raises(SystemExit):
        monkeypatch.setattr(sys, "argv", ["cbpo-orch", "audit"])
        main()
    shown = capsys.readouterr().out.strip()
    assert shown.startswith(line["at"]) and f" forget {subject_digest(gone)} " in shown and gone not in shown


def test_forget_refuses_while_a_live_driver_runs_a_job_of_the_user(tmp_path, monkeypatch):
    from cbpo_orch.orchestrator.forget import UserInUse, forget_user
    from cbpo_orch.orchestrator.workspace import Workspace

    space = Workspace.open(tmp_path / "home", writes=True)
    job = space.registry.create_job("lamp4", ["sft"], ["u1"], {})
    space.registry.set_job_state(job, "running")
    space.registry.take_lease(job, "another-driver", 60)
    with pytest.raises(UserInUse, match=f"job {job} of user u1 is running"):
        forget_user(space, "u1")
    assert [run.user_id for run in space.registry.runs(job)] == ["u1"] and space.registry.audit_log() == []


def _succeed(registry: Registry, job: str, user: str) -> int:
    (run,) = [r for r in registry.runs(job) if r.user_id == user]
    registry.mark_running(run.run_id)
    metrics = {"rouge1": 0.5, "rougeL": 0.4, "n_pos": 4, "n_aux": 4, "seconds": 1.0, "extra": {"predictions": [{"id": "q", "prediction": "p"}]}}
    registry.record_success(run.run_id, metrics, {"path": f"/a/{job}/{user}", "sha256": "ab" * 32, "bytes": 1})
    return run.run_id


def test_forget_in_the_registry_removes_every_row_of_the_user_and_only_in_the_line_asked(db_url: str) -> None:
    from cbpo_orch.storage.lineage import RunInputs

    with Registry(db_url) as registry:
        first = registry.create_job("lamp4", ["cbpo"], ["u1", "u2"], {"users": ["u1", "u2"]})
        other = registry.create_job("lamp4", ["cbpo"], ["u1", "u3"], {"users": ["u1", "u3"]})
        runs = {(job, user): _succeed(registry, job, user) for job, user in [(first, "u1"), (first, "u2"), (other, "u1"), (other, "u3")]}
        registry.record_inputs({runs[(first, "u2")]: RunInputs("fp", 4, ("u1",)), runs[(other, "u3")]: RunInputs("fp", 4, ("u1",))})

        forgotten = registry.forget("u1", first)  # only the first job's line
        assert (forgotten.jobs, forgotten.runs, forgotten.versions) == ([first], 1, 1)
        assert forgotten.adapter_paths == [f"/a/{first}/u1"] and forgotten.aux_users_of == [("u2", "cbpo", first)]
        assert registry.job(first).users == ["u2"] and registry.job(first).config["users"] == ["u2"]
        assert [r.user_id for r in registry.runs(other)] == ["u1", "u3"]

        forgotten = registry.forget("u1")
        assert (forgotten.jobs, forgotten.runs, forgotten.aux_users_of) == ([other], 1, [("u3", "cbpo", other)])
        assert _rows_naming(registry, "u1") == []
        assert [row["user_id"] for row in registry.results(first) + registry.results(other)] == ["u2", "u3"]
        assert registry.forget("u1").runs == 0  # a second forget finds nothing


def test_erasing_says_so_when_another_reader_keeps_the_sqlite_log_in_use(sqlite_url: str, monkeypatch) -> None:
    import sqlite3

    from cbpo_orch.storage import engine

    monkeypatch.setattr(engine, "BUSY_TIMEOUT_S", 0.2)
    with Registry(sqlite_url) as registry:
        registry.create_job("lamp4", ["sft"], ["u1"], {})
        reader = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM jobs").fetchone()  # holds its snapshot of the log
        registry.create_job("lamp4", ["sft"], ["u2"], {})
        assert registry.erase_freed() is False
        reader.execute("COMMIT")
        reader.close()
        assert registry.erase_freed() is True


def test_a_forgotten_user_in_a_new_job_on_the_same_data_fails_its_run_with_the_reason(tmp_path, tiny_model_dir, monkeypatch):
    """The data's history index keeps leaving a forgotten user's items out, so a later job on
    the same data that names the user fails that user's runs at once with why (no KeyError, no
    retries) and trains the others."""
    from cbpo_orch.method.config import TrainConfig
    from cbpo_orch.orchestrator.driver import run_job
    from cbpo_orch.orchestrator.forget import forget_user
    from cbpo_orch.orchestrator.spec import JobSpec, Resources
    from tests.in_process import TRAIN

    without_ray(monkeypatch)
    space, _, users, v1, _ = finished_job(tmp_path, tiny_model_dir, ("sft",))
    gone, kept = users[0], users[1]
    forget_user(space, gone)
    spec = JobSpec(task="lamp4", data=str(v1), split="dev", model=str(tiny_model_dir), methods=("cbpo",), users=(gone, kept),
                   train=TrainConfig(method="cbpo", **TRAIN))
    again = space.registry.create_job("lamp4", ["cbpo"], [gone, kept], spec.to_config(Resources(workers=1)))
    run_job(space, again)
    runs = {run.user_id: run for run in space.registry.runs(again)}
    assert runs[kept].state == "succeeded"
    assert (runs[gone].state, runs[gone].attempts) == ("failed", 1)
    assert runs[gone].error.startswith(f"DataError: user {gone} was forgotten (cbpo-orch forget)")
