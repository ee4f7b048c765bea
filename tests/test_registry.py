"""Tests of the registry database: job and run life cycle, idempotency, schema, concurrency."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session

from cbpo_orch.storage import schema
from cbpo_orch.storage.artifacts import ArtifactStore
from cbpo_orch.storage.engine import make_engine, transact, writer
from cbpo_orch.storage.models import SCHEMA_VERSION, Adapter, Metric, SchemaVersion
from cbpo_orch.storage.registry import (
    RESULT_COLUMNS,
    InvalidTransition,
    Registry,
    UnknownJob,
    UnknownRun,
)

METRICS = {
    "rouge1": 0.5,
    "rougeL": 0.4,
    "gamma": 0.7,
    "gamma_reason": "calibrated",
    "n_pos": 12,
    "n_aux": 30,
    "seconds": 9.5,
    "phase_seconds": {"aux": 1.0, "gamma": 0.5, "train": 6.0, "generate": 1.5, "score": 0.5},
    "extra": {"loss": [1.0, 0.5]},
}
ADAPTER = {"path": "/artifacts/u1/cbpo", "sha256": "ab" * 32, "bytes": 1234}


@pytest.fixture
def registry(db_url: str):
    with Registry(db_url) as opened:
        yield opened


def _count(url: str, model: type) -> int:
    engine = create_engine(url)
    try:
        with Session(engine) as session:
            return session.scalar(select(func.count()).select_from(model))
    finally:
        engine.dispose()


def _run(registry: Registry, job_id: str, user: str, method: str):
    (found,) = [r for r in registry.runs(job_id) if (r.user_id, r.method) == (user, method)]
    return found


def test_create_job_makes_one_pending_run_per_user_and_method(registry: Registry) -> None:
    job_id = registry.create_job("lamp4", ["cbpo", "sft"], ["u1", "u2", "u3"], {"seed": 3})
    job = registry.job(job_id)
    runs = registry.runs(job_id)
    assert len(job_id) == 12 and int(job_id, 16) >= 0
    assert (job.task, job.methods, job.users, job.config) == (
        "lamp4",
        ["cbpo", "sft"],
        ["u1", "u2", "u3"],
        {"seed": 3},
    )
    assert job.state == "pending" and job.finished_at is None
    created = datetime.fromisoformat(job.created_at)
    assert created.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - created) < timedelta(minutes=1)
    assert job.counts == {"pending": 6, "running": 0, "succeeded": 0, "failed": 0}
    assert sorted((r.user_id, r.method) for r in runs) == [
        (u, m) for u in ("u1", "u2", "u3") for m in ("cbpo", "sft")
    ]
    assert {(r.state, r.attempts, r.error) for r in runs} == {("pending", 0, None)}


def test_create_job_rejects_bad_input_and_writes_nothing(registry: Registry) -> None:
    with pytest.raises(ValueError, match="duplicates"):
        registry.create_job("t", ["cbpo"], ["u1", "u1"], {})
    with pytest.raises(ValueError, match="empty"):
        registry.create_job("t", [], ["u1"], {})
    with pytest.raises(TypeError):
        registry.create_job("t", ["cbpo"], [1, 2], {})
    assert registry.jobs() == []


def test_unknown_ids_raise_key_errors_with_clear_messages(registry: Registry) -> None:
    with pytest.raises(UnknownJob) as caught:
        registry.job("nope")
    assert isinstance(caught.value, KeyError)
    assert str(caught.value) == "no job with id 'nope' in the registry"
    with pytest.raises(UnknownJob):
        registry.runs("nope")
    with pytest.raises(UnknownRun):
        registry.mark_running(999)


def test_success_path_and_no_restart_after_success(registry: Registry) -> None:
    job_id = registry.create_job("t", ["cbpo"], ["u1"], {})
    run = registry.runs(job_id)[0]
    started = registry.mark_running(run.run_id)
    assert (started.state, started.attempts) == ("running", 1)
    assert registry.job(job_id).counts["running"] == 1
    assert registry.record_success(run.run_id, METRICS, ADAPTER) is True
    assert registry.runs(job_id)[0].state == "succeeded"
    with pytest.raises(InvalidTransition, match="succeeded"):
        registry.mark_running(run.run_id)


def test_non_final_failure_returns_to_pending_and_final_failure_keeps_reason(
    registry: Registry,
) -> None:
    job_id = registry.create_job("t", ["cbpo"], ["u1"], {})
    run_id = registry.runs(job_id)[0].run_id
    registry.mark_running(run_id)
    assert registry.record_failure(run_id, "CUDA out of memory", final=False) is True
    retried = registry.runs(job_id)[0]
    assert (retried.state, retried.attempts, retried.error) == ("pending", 1, "CUDA out of memory")
    assert registry.mark_running(run_id).attempts == 2
    assert registry.record_failure(run_id, "loss is NaN", final=True) is True
    failed = registry.runs(job_id)[0]
    assert (failed.state, failed.attempts, failed.error) == ("failed", 2, "loss is NaN")
    assert registry.runs(job_id, states=["failed"]) == [failed]
    assert registry.record_failure(run_id, "late", final=False) is False
    assert registry.runs(job_id)[0].error == "loss is NaN"
    with pytest.raises(InvalidTransition):
        registry.mark_running(run_id)
    with pytest.raises(InvalidTransition):
        registry.record_success(run_id, METRICS, ADAPTER)


def test_record_success_twice_writes_one_metric_and_one_adapter(
    registry: Registry, db_url: str
) -> None:
    job_id = registry.create_job("t", ["cbpo"], ["u1"], {})
    run_id = registry.runs(job_id)[0].run_id
    registry.mark_running(run_id)
    assert registry.record_success(run_id, METRICS, ADAPTER) is True
    changed = {**METRICS, "rouge1": 0.9}
    other = {**ADAPTER, "path": "/elsewhere"}
    assert registry.record_success(run_id, changed, other) is False
    assert _count(db_url, Metric) == 1
    assert _count(db_url, Adapter) == 1
    (row,) = registry.results(job_id)
    assert (row["rouge1"], row["adapter_path"]) == (0.5, "/artifacts/u1/cbpo")


def test_unique_constraints_forbid_a_second_metric_or_adapter(
    registry: Registry, db_url: str
) -> None:
    job_id = registry.create_job("t", ["cbpo"], ["u1"], {})
    run_id = registry.runs(job_id)[0].run_id
    registry.mark_running(run_id)
    registry.record_success(run_id, METRICS, ADAPTER)
    engine = make_engine(db_url)
    try:
        for row in (
            Adapter(run_id=run_id, path="/x", sha256="0" * 64, bytes=1),
            Metric(
                run_id=run_id, rouge1=0, rougeL=0, n_pos=0, n_aux=0, seconds=0, phase_seconds={}
            ),
        ):
            with Session(engine) as session, pytest.raises(IntegrityError):
                session.add(row)
                session.commit()
    finally:
        engine.dispose()


def test_record_success_validates_its_input(registry: Registry) -> None:
    job_id = registry.create_job("t", ["cbpo"], ["u1"], {})
    run_id = registry.runs(job_id)[0].run_id
    registry.mark_running(run_id)
    missing = {k: v for k, v in METRICS.items() if k != "rougeL"}
    with pytest.raises(ValueError, match="rougeL"):
        registry.record_success(run_id, missing, ADAPTER)
    with pytest.raises(ValueError, match="rogue1"):
        registry.record_success(run_id, {**METRICS, "rogue1": 1.0}, ADAPTER)
    with pytest.raises(ValueError, match="keys"):
        registry.record_success(run_id, METRICS, {"path": "/x"})
    assert registry.runs(job_id)[0].state == "running"


def test_artifact_info_records_as_adapter(registry: Registry, tmp_path: Path) -> None:
    info = ArtifactStore(tmp_path / "artifacts").write_dir("j/u1/cbpo", {"a.bin": b"weights"})
    job_id = registry.create_job("t", ["cbpo"], ["u1"], {})
    run_id = registry.runs(job_id)[0].run_id
    registry.mark_running(run_id)
    registry.record_success(run_id, METRICS, info.as_dict())
    (row,) = registry.results(job_id)
    assert (row["adapter_path"], row["sha256"]) == (str(info.path), info.sha256)


def test_reset_interrupted_sends_running_runs_back_to_pending(registry: Registry) -> None:
    job_id = registry.create_job("t", ["cbpo"], ["u1", "u2", "u3"], {})
    runs = registry.runs(job_id)
    for run in runs:
        registry.mark_running(run.run_id)
    registry.record_success(runs[0].run_id, METRICS, None)
    assert registry.reset_interrupted(job_id) == 2
    states = {r.user_id: (r.state, r.attempts) for r in registry.runs(job_id)}
    assert states == {"u1": ("succeeded", 1), "u2": ("pending", 1), "u3": ("pending", 1)}
    assert registry.reset_interrupted(job_id) == 0


def test_cancel_cancels_pending_runs_and_the_job(registry: Registry) -> None:
    job_id = registry.create_job("t", ["cbpo"], ["u1", "u2", "u3"], {})
    running = _run(registry, job_id, "u1", "cbpo")
    registry.mark_running(running.run_id)
    assert registry.cancel(job_id) == 2
    job = registry.job(job_id)
    assert job.state == "cancelled" and job.finished_at is not None
    assert job.counts == {"pending": 0, "running": 1, "succeeded": 0, "failed": 0, "cancelled": 2}
    cancelled = _run(registry, job_id, "u2", "cbpo")
    with pytest.raises(InvalidTransition, match="cancelled"):
        registry.mark_running(cancelled.run_id)
    assert registry.cancel(job_id) == 0


def test_results_have_exactly_the_listed_columns_sorted(registry: Registry) -> None:
    job_id = registry.create_job("t", ["sft", "cbpo"], ["u2", "u1"], {})
    for user, method in [("u2", "sft"), ("u1", "sft"), ("u1", "cbpo")]:
        run = _run(registry, job_id, user, method)
        registry.mark_running(run.run_id)
        adapter = None if method == "sft" else {**ADAPTER, "path": f"/a/{user}/{method}"}
        registry.record_success(run.run_id, {**METRICS, "n_pos": len(user + method)}, adapter)
    rows = registry.results(job_id)
    assert RESULT_COLUMNS == (
        "user_id",
        "method",
        "rouge1",
        "rougeL",
        "gamma",
        "n_pos",
        "n_aux",
        "adapter_path",
        "sha256",
        "seconds",
    )
    assert [tuple(row) for row in rows] == [RESULT_COLUMNS] * 3
    assert [(r["user_id"], r["method"]) for r in rows] == [
        ("u1", "cbpo"),
        ("u1", "sft"),
        ("u2", "sft"),
    ]
    assert rows[0] == {
        "user_id": "u1",
        "method": "cbpo",
        "rouge1": 0.5,
        "rougeL": 0.4,
        "gamma": 0.7,
        "n_pos": 6,
        "n_aux": 30,
        "adapter_path": "/a/u1/cbpo",
        "sha256": "ab" * 32,
        "seconds": 9.5,
    }
    assert (rows[1]["adapter_path"], rows[1]["sha256"]) == (None, None)


def test_jobs_are_listed_newest_first_with_counts(registry: Registry) -> None:
    first = registry.create_job("a", ["cbpo"], ["u1", "u2"], {})
    second = registry.create_job("b", ["cbpo"], ["u1"], {})
    run = registry.runs(first)[0]
    registry.mark_running(run.run_id)
    registry.record_failure(run.run_id, "boom", final=True)
    listed = registry.jobs()
    assert [job.job_id for job in listed] == [second, first]
    assert listed[0].created_at > listed[1].created_at
    assert listed[1].counts == {"pending": 1, "running": 0, "succeeded": 0, "failed": 1}
    assert listed[0].counts == {"pending": 1, "running": 0, "succeeded": 0, "failed": 0}


def test_set_job_state(registry: Registry) -> None:
    job_id = registry.create_job("t", ["cbpo"], ["u1"], {})
    registry.set_job_state(job_id, "running")
    assert (registry.job(job_id).state, registry.job(job_id).finished_at) == ("running", None)
    registry.set_job_state(job_id, "failed", error="driver lost")
    job = registry.job(job_id)
    assert (job.state, job.error) == ("failed", "driver lost")
    assert job.finished_at is not None
    with pytest.raises(ValueError, match="unknown job state"):
        registry.set_job_state(job_id, "done")


def test_task_adapter_cache_keeps_the_first_entry(registry: Registry) -> None:
    assert registry.task_adapter("k1") is None
    stored = registry.record_task_adapter("k1", "lamp4", "qwen", "/tam/k1", "cd" * 32, 99)
    again = registry.record_task_adapter("k1", "lamp4", "qwen", "/tam/other", "ef" * 32, 5)
    assert again == stored == registry.task_adapter("k1")
    assert (stored["path"], stored["bytes"]) == ("/tam/k1", 99)


def test_schema_version_row_is_written(registry: Registry, db_url: str) -> None:
    engine = create_engine(db_url)
    with Session(engine) as session:
        assert session.scalars(select(SchemaVersion.version)).all() == [SCHEMA_VERSION]
    engine.dispose()


def _set_stored_version(url: str, version: int) -> None:
    engine = create_engine(url)
    with Session(engine) as session:
        session.execute(update(SchemaVersion).values(version=version))
        session.commit()
    engine.dispose()


def test_newer_schema_version_is_refused(registry: Registry, db_url: str) -> None:
    _set_stored_version(db_url, SCHEMA_VERSION + 1)
    with pytest.raises(schema.SchemaVersionError, match="newer"):
        Registry(db_url)


def test_older_schema_version_is_migrated(
    registry: Registry, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _set_stored_version(db_url, SCHEMA_VERSION - 1)
    monkeypatch.delitem(schema.MIGRATIONS, SCHEMA_VERSION - 1)
    with pytest.raises(schema.SchemaVersionError, match="no migration"):
        Registry(db_url)
    applied: list[int] = []
    monkeypatch.setitem(
        schema.MIGRATIONS, SCHEMA_VERSION - 1, lambda connection: applied.append(1)
    )
    Registry(db_url).close()
    assert applied == [1]
    Registry(db_url).close()
    assert applied == [1]


def test_sqlite_uses_wal_and_a_busy_timeout(sqlite_url: str) -> None:
    Registry(sqlite_url).close()
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    engine = make_engine(sqlite_url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_a_write_waits_for_another_writer(sqlite_url: str) -> None:
    with Registry(sqlite_url) as registry:
        raw = sqlite3.connect(
            sqlite_url.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False
        )
        raw.execute("BEGIN IMMEDIATE")
        releaser = threading.Timer(0.5, raw.execute, args=("COMMIT",))
        releaser.start()
        started = time.monotonic()
        job_id = registry.create_job("t", ["cbpo"], ["u1"], {})
        releaser.join()
        raw.close()
        assert time.monotonic() - started >= 0.4
        assert registry.job(job_id).counts["pending"] == 1


def _in_two_processes(target, *args) -> list:
    """Run ``target(*args, barrier, results)`` in two spawned processes; return what each put."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    workers = [
        context.Process(target=target, args=(*args, barrier, results), daemon=True)
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    return [results.get(timeout=5) for _ in workers]


def _submit_and_finish(url: str, n_users: int, barrier, results) -> None:
    barrier.wait()
    with Registry(url) as registry:
        job_id = registry.create_job("t", ["cbpo"], [f"u{i}" for i in range(n_users)], {})
        for run in registry.runs(job_id):
            registry.mark_running(run.run_id)
            registry.record_success(run.run_id, METRICS, {**ADAPTER, "path": f"/a/{run.run_id}"})
        results.put(job_id)


def test_two_processes_share_one_registry(db_url: str) -> None:
    job_ids = _in_two_processes(_submit_and_finish, db_url, 20)
    with Registry(db_url) as registry:
        assert sorted(job.job_id for job in registry.jobs()) == sorted(job_ids)
        for job_id in job_ids:
            assert registry.job(job_id).counts == {
                "pending": 0,
                "running": 0,
                "succeeded": 20,
                "failed": 0,
            }
            assert len(registry.results(job_id)) == 20
    assert _count(db_url, Metric) == 40
    assert _count(db_url, Adapter) == 40


def _race_through_job(url: str, job_id: str, barrier, results) -> None:
    """Start and finish every run of ``job_id``: cbpo runs succeed, sft runs fail for good.

    Puts how many runs this process recorded (calls that returned True).
    """
    barrier.wait()
    recorded = 0
    with Registry(url) as registry:
        for run in registry.runs(job_id):
            try:
                registry.mark_running(run.run_id)
            except InvalidTransition:
                continue
            if run.method == "cbpo":
                adapter = {**ADAPTER, "path": f"/a/{run.run_id}"}
                recorded += registry.record_success(run.run_id, METRICS, adapter)
            else:
                recorded += registry.record_failure(run.run_id, "diverged", final=True)
    results.put(recorded)


def test_two_processes_racing_through_one_job_record_each_run_once(db_url: str) -> None:
    users = [f"u{i}" for i in range(6)]
    with Registry(db_url) as registry:
        job_id = registry.create_job("t", ["cbpo", "sft"], users, {})
    recorded = _in_two_processes(_race_through_job, db_url, job_id)
    assert sum(recorded) == 12
    with Registry(db_url) as registry:
        job = registry.job(job_id)
        runs = registry.runs(job_id)
        results = registry.results(job_id)
    assert job.counts == {"pending": 0, "running": 0, "succeeded": 6, "failed": 6}
    assert {(r.method, r.state, r.error) for r in runs} == {
        ("cbpo", "succeeded", None),
        ("sft", "failed", "diverged"),
    }
    assert {r.attempts for r in runs} <= {1, 2}
    assert [row["user_id"] for row in results] == users
    assert {row["adapter_path"] for row in results} == {
        f"/a/{r.run_id}" for r in runs if r.method == "cbpo"
    }
    assert _count(db_url, Metric) == 6
    assert _count(db_url, Adapter) == 6


def test_writer_transactions_take_the_write_lock_at_begin(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    try:
        with writer(engine).begin() as connection:
            connection.exec_driver_sql("SELECT 1")
            other = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=0)
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                other.execute("BEGIN IMMEDIATE")
            other.close()
    finally:
        engine.dispose()


def test_opening_the_registry_to_read_does_not_wait_for_a_writer(sqlite_url: str) -> None:
    """``status`` while a driver writes: its open must not queue behind the write lock."""
    with Registry(sqlite_url) as registry:
        job_id = registry.create_job("t", ["sft"], ["u1"], {})
    driver = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    driver.isolation_level = None
    driver.execute("BEGIN IMMEDIATE")  # a driver in the middle of recording a run
    try:
        started = time.monotonic()
        with Registry(sqlite_url) as reader:
            assert reader.job(job_id).counts["pending"] == 1
        assert time.monotonic() - started < 1.0
    finally:
        driver.execute("ROLLBACK")
        driver.close()


def test_transact_retries_when_the_database_is_locked(sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    calls: list[int] = []

    def work(session: Session) -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("BEGIN", {}, sqlite3.OperationalError("database is locked"))
        return "done"

    try:
        assert transact(engine, work) == "done"
        assert len(calls) == 3
    finally:
        engine.dispose()


def test_transact_retries_the_victim_of_a_real_postgresql_deadlock(postgres_url: str) -> None:
    """Two transactions lock two rows in opposite orders; the server aborts one of them
    (40P01), and transact runs it again, so both commit."""
    from sqlalchemy import text

    engine = make_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE pair (id INT PRIMARY KEY, hits INT NOT NULL)"))
        connection.execute(text("INSERT INTO pair VALUES (1, 0), (2, 0)"))
    both_hold_one = threading.Barrier(2, timeout=30)
    attempts = {1: 0, 2: 0}

    def work(first: int, second: int):
        def transaction(session: Session) -> None:
            attempts[first] += 1
            session.execute(text("UPDATE pair SET hits = hits + 1 WHERE id = :id"), {"id": first})
            if attempts[first] == 1:
                both_hold_one.wait()
            session.execute(text("UPDATE pair SET hits = hits + 1 WHERE id = :id"), {"id": second})

        return transaction

    errors: list[BaseException] = []

    def run(first: int, second: int) -> None:
        try:
            transact(engine, work(first, second))
        except BaseException as error:  # reported below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=pair) for pair in ((1, 2), (2, 1))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        assert sorted(attempts.values()) == [1, 2], "one transaction was the deadlock's victim and ran again"
        with engine.connect() as connection:
            assert connection.execute(text("SELECT hits FROM pair ORDER BY id")).scalars().all() == [2, 2]
    finally:
        engine.dispose()


def test_numpy_values_are_stored_as_plain_numbers(registry: Registry) -> None:
    numpy = pytest.importorskip("numpy")
    job_id = registry.create_job("t", ["cbpo"], ["u1"], {"lr": numpy.float32(0.5)})
    run_id = registry.runs(job_id)[0].run_id
    registry.mark_running(run_id)
    metrics = {
        **METRICS,
        "rouge1": numpy.float32(0.25),
        "n_pos": numpy.int64(3),
        "extra": {"loss": numpy.array([1.0, 0.5])},
    }
    registry.record_success(run_id, metrics, None)
    (row,) = registry.results(job_id)
    assert (row["rouge1"], row["n_pos"]) == (0.25, 3)
    assert registry.job(job_id).config == {"lr": 0.5}
    assert registry.extras(job_id) == {("u1", "cbpo"): {"loss": [1.0, 0.5]}}


def test_an_open_that_finds_the_file_locked_tries_again(tmp_path, monkeypatch):
    """Two processes opening a fresh SQLite file at once: the WAL switch of one may report
    "database is locked" at once; the open tries again instead of failing."""
    from cbpo_orch.storage import engine as engine_module

    configure, calls = engine_module._configure_sqlite_connection, []

    def locked_once(dbapi_connection, record):
        calls.append(1)
        if len(calls) == 1:
            raise sqlite3.OperationalError("database is locked")
        configure(dbapi_connection, record)

    monkeypatch.setattr(engine_module, "_configure_sqlite_connection", locked_once)
    with Registry(f"sqlite:///{tmp_path / 'registry.db'}") as registry:
        assert registry.create_job("lamp4", ["sft"], ["u1"], {}) and len(calls) >= 2


def test_every_stopped_job_message_gives_the_same_resume_advice():
    from cbpo_orch.storage.registry import resume_advice

    assert resume_advice("abc") == "every finished run is kept: `cbpo-orch resume abc` finishes the job"
    assert resume_advice("abc", "free space") == "every finished run is kept: free space, then `cbpo-orch resume abc` finishes the job"
