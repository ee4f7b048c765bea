"""Adapter versions in the registry, on SQLite and PostgreSQL: a line of updates, promotion
against the current version's score on the new version's items (its recorded score where none
was measured), rejection, ``--promote always``, rollback, and a registry made before versions
existed (schema 4) migrated with its adapters as version 1."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, select, text

from cbpo_orch.storage.engine import transact
from cbpo_orch.storage.lineage import ParentScore, PlannedRun, RunInputs
from cbpo_orch.storage.models import SCHEMA_VERSION, AuxSource
from cbpo_orch.storage.registry import Registry

METRICS = {"rouge1": 0.5, "rougeL": 0.4, "n_pos": 4, "n_aux": 0, "seconds": 1.0}


@pytest.fixture
def registry(db_url: str):
    with Registry(db_url) as opened:
        yield opened


def _succeed(registry: Registry, job: str, user: str, score: float | None, method: str = "sft", parent: ParentScore | None = None) -> None:
    (run,) = [r for r in registry.runs(job) if (r.user_id, r.method) == (user, method) and r.source_run_id is None]
    registry.mark_running(run.run_id)
    registry.record_success(run.run_id, {**METRICS, "rouge1": score, "rougeL": score}, {"path": f"/a/{job}/{user}/{method}", "sha256": "ab" * 32, "bytes": 1}, parent)


def _update(registry: Registry, parent: str, trained: list[str], carried: list[str], promote: str = "check") -> str:
    basis = registry.update_basis(parent)
    planned = [PlannedRun(u, "sft", None, RunInputs(f"fp-{u}-new", 5)) for u in trained]
    planned += [PlannedRun(u, "sft", basis[(u, "sft")].carry_run_id, RunInputs("same", 4)) for u in carried]
    return registry.create_update(parent, {"users": trained + carried}, planned, promote)


def _states(registry: Registry, job: str, user: str) -> list[tuple[int, str, int | None]]:
    return [(row["version"], row["state"], row["parent"]) for row in registry.versions(job, user)]


def test_a_version_worse_than_the_current_one_on_its_own_items_is_kept_as_rejected_and_the_current_one_stays(registry: Registry) -> None:
    job = registry.create_job("lamp4", ["sft"], ["u1", "u2"], {})
    for user in ("u1", "u2"):
        _succeed(registry, job, user, 0.5)  # on the items of the data it was trained with
    update = _update(registry, job, ["u1", "u2"], [])
    incumbents = registry.incumbents(update)
    assert {key: found.adapter_path for key, found in incumbents.items()} == {("u1", "sft"): f"/a/{job}/u1/sft", ("u2", "sft"): f"/a/{job}/u2/sft"}
    # each compared with v1 scored on the new version's items, not with v1's recorded 0.5
    _succeed(registry, update, "u1", 0.2, parent=ParentScore(incumbents[("u1", "sft")].version_id, 0.3))  # worse: rejected
    _succeed(registry, update, "u2", 0.4, parent=ParentScore(incumbents[("u2", "sft")].version_id, 0.3))  # better: promoted
    assert _states(registry, job, "u1") == [(1, "current", None), (2, "rejected", 1)]
    assert _states(registry, update, "u2") == [(1, "superseded", None), (2, "current", 1)]
    rejected = registry.versions(update, "u1")[1]
    assert (rejected["score"], rejected["parent_score"], rejected["job_id"], rejected["data_fingerprint"], rejected["n_items"]) == (0.2, 0.3, update, "fp-u1-new", 5)
    assert registry.versions(update, "u2")[1]["parent_score"] == 0.3

    later = _update(registry, update, [], ["u1", "u2"])  # carries the current versions, not the rejected one
    rows = {row["user_id"]: row for row in registry.results(later)}
    assert rows["u1"]["adapter_path"] == f"/a/{job}/u1/sft" and rows["u2"]["adapter_path"] == f"/a/{update}/u2/sft"
    assert registry.job(later).counts["succeeded"] == 2 and registry.job(later).line_id == job


def test_without_a_score_of_the_current_version_on_the_new_items_its_recorded_score_is_compared(registry: Registry) -> None:
    job = registry.create_job("lamp4", ["sft"], ["u1", "u2"], {})
    for user in ("u1", "u2"):
        _succeed(registry, job, user, 0.5)
    update = _update(registry, job, ["u1", "u2"], [])
    stale = registry.incumbents(update)[("u1", "sft")]
    rival = _update(registry, job, ["u1"], [], promote="always")
    _succeed(registry, rival, "u1", 0.1)  # v2 current while the update's run ran
    _succeed(registry, update, "u1", 0.3, parent=ParentScore(stale.version_id, 0.05))  # scored v1: not the current one
    _succeed(registry, update, "u2", 0.4)  # nothing measured
    assert _states(registry, job, "u1") == [(1, "superseded", None), (2, "superseded", 1), (3, "current", 2)]
    assert registry.versions(job, "u1")[2]["parent_score"] == 0.1
    assert _states(registry, job, "u2") == [(1, "current", None), (2, "rejected", 1)]
    assert registry.versions(job, "u2")[1]["parent_score"] == 0.5


def test_promote_always_makes_the_worse_version_current(registry: Registry) -> None:
    job = registry.create_job("lamp4", ["sft"], ["u1"], {})
    _succeed(registry, job, "u1", 0.5)
    update = _update(registry, job, ["u1"], [], promote="always")
    assert registry.incumbents(update) == {}  # its workers score no current adapter
    _succeed(registry, update, "u1", 0.1)
    assert _states(registry, job, "u1") == [(1, "superseded", None), (2, "current", 1)]
    assert registry.versions(job, "u1")[1]["parent_score"] is None  # nothing was compared


def test_a_version_without_a_score_is_promoted_there_being_nothing_to_compare(registry: Registry) -> None:
    job = registry.create_job("lamp4", ["sft"], ["u1"], {})
    _succeed(registry, job, "u1", 0.5)
    update = _update(registry, job, ["u1"], [])
    _succeed(registry, update, "u1", None)
    assert _states(registry, job, "u1") == [(1, "superseded", None), (2, "current", 1)]


def test_rollback_makes_the_previous_version_current_once(registry: Registry) -> None:
    job = registry.create_job("lamp4", ["sft"], ["u1"], {})
    _succeed(registry, job, "u1", 0.5)
    update = _update(registry, job, ["u1"], [])
    _succeed(registry, update, "u1", 0.7)
    assert registry.rollback(update, "u1") == [("sft", 2, 1)]
    assert _states(registry, job, "u1") == [(1, "current", None), (2, "rolled-back", 1)]
    assert registry.rollback(job, "u1") == []  # version 1 replaced none
    again = _update(registry, update, ["u1"], [])
    _succeed(registry, again, "u1", 0.6)
    assert _states(registry, job, "u1") == [(1, "superseded", None), (2, "rolled-back", 1), (3, "current", 1)]


def test_a_schema_4_registry_is_migrated_with_each_adapter_as_a_current_version_1(db_url: str) -> None:
    with Registry(db_url) as registry:
        job = registry.create_job("lamp4", ["sft"], ["u1", "u2"], {})
        _succeed(registry, job, "u1", 0.5)
    engine = create_engine(db_url)
    with engine.begin() as connection:  # back to schema 4: no lifecycle columns or tables
        for table in ("audit_log", "aux_sources", "adapter_versions"):
            connection.execute(text(f"DROP TABLE {table}"))
        for table, columns in {"jobs": ("parent_job_id", "line_id", "promote"), "user_runs": ("data_fingerprint", "n_items", "source_run_id")}.items():
            for column in columns:
                connection.execute(text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        connection.execute(text("UPDATE schema_version SET version = 4"))
    engine.dispose()
    with Registry(db_url) as registry:
        assert [(row["user_id"], row["version"], row["state"], row["score"], row["data_fingerprint"]) for row in registry.versions(job)] == [("u1", 1, "current", 0.5, None)]
        update = _update(registry, job, ["u1", "u2"], [])
        _succeed(registry, update, "u1", 0.6)
        assert _states(registry, job, "u1") == [(1, "superseded", None), (2, "current", 1)]
    engine = create_engine(db_url)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT version FROM schema_version")).scalar() == SCHEMA_VERSION
    engine.dispose()


def test_an_update_of_a_failed_run_trains_it_again_even_where_an_older_version_is_current(registry: Registry) -> None:
    job = registry.create_job("lamp4", ["sft"], ["u1"], {})
    _succeed(registry, job, "u1", 0.5)
    update = _update(registry, job, ["u1"], [])
    (run,) = registry.runs(update)
    registry.mark_running(run.run_id)
    registry.record_failure(run.run_id, "boom", final=True)
    assert registry.update_basis(update)[("u1", "sft")].carry_run_id is None
    assert registry.update_basis(job)[("u1", "sft")].carry_run_id == registry.runs(job)[0].run_id


def test_run_inputs_are_recorded_and_replaced(registry: Registry) -> None:
    job = registry.create_job("lamp4", ["cbpo"], ["u1", "u2"], {})
    runs = {run.user_id: run.run_id for run in registry.runs(job)}
    registry.record_inputs({runs["u1"]: RunInputs("a" * 64, 7, ("u2", "u3", "u2"))})
    registry.record_inputs({runs["u1"]: RunInputs("b" * 64, 8, ("u3",)), runs["u2"]: RunInputs("c" * 64, 9)})
    found = {run.user_id: (run.data_fingerprint, run.n_items) for run in registry.runs(job)}
    assert found == {"u1": ("b" * 64, 8), "u2": ("c" * 64, 9)}
    rows = transact(registry._engine, lambda session: sorted(session.execute(select(AuxSource.run_id, AuxSource.user_id)).all()))
    assert rows == [(runs["u1"], "u3")]
