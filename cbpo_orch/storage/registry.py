"""The registry: jobs, their per-(user, method) runs, metrics, adapters and the TAM cache.

Only the Ray driver writes through a :class:`Registry`.  Every public method
runs one short transaction and returns plain values (frozen dataclasses,
dicts); no ORM object leaves this module.

Run state machine::

    pending --mark_running--------------------> running   (attempts += 1)
    running --record_success------------------> succeeded (final; never written twice)
    running --record_failure(final=False)-----> pending   (retried; error kept)
    running --record_failure(final=True)------> failed    (final; error kept)
    pending --cancel--------------------------> cancelled (final)
    pending --record_failure(final=True)------> failed    (final; never started: its workers cannot start)

A run left ``running`` by a dead driver may be restarted directly with
:meth:`Registry.mark_running` or sent back to ``pending`` with
:meth:`Registry.reset_interrupted`.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from . import lineage
from .engine import make_engine, transact, writer
from .lineage import Basis, Forgotten, Incumbent, ParentScore, PlannedRun, RunInputs
from .models import (
    FREE_LEASE,
    JOB_STATES,
    PROMOTE_POLICIES,
    RUN_STATES,
    Adapter,
    AuditEntry,
    DriverLease,
    Job,
    Metric,
    TaskAdapter,
    UserRun,
    utcnow,
)
from .schema import is_current, prepare_schema

COUNTED_STATES = ("pending", "running", "succeeded", "failed")
"""Run states always present in :attr:`JobInfo.counts` (``cancelled`` only when non-zero)."""

FINAL_JOB_STATES = ("succeeded", "failed", "cancelled")
"""Job states that set ``finished_at`` and that :meth:`Registry.cancel` leaves alone."""

RESULT_COLUMNS = (
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
"""Keys of every row returned by :meth:`Registry.results`, in order."""

_STARTABLE = ("pending", "running")
_FLOAT_METRICS = ("rouge1", "rougeL", "seconds")
_SCORES = ("rouge1", "rougeL")
"""Metrics that are None for a run whose user has no gold output to score against."""
_INT_METRICS = ("n_pos", "n_aux")
_OPTIONAL_METRICS = ("gamma", "gamma_reason", "phase_seconds", "extra")
_ADAPTER_KEYS = ("path", "sha256", "bytes")


class UnknownJob(KeyError):
    """No job with this id exists in the registry."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"no job with id {self.job_id!r} in the registry"


class UnknownRun(KeyError):
    """No run with this id exists in the registry."""

    def __init__(self, run_id: int) -> None:
        super().__init__(run_id)
        self.run_id = run_id

    def __str__(self) -> str:
        return f"no run with id {self.run_id!r} in the registry"


class InvalidTransition(ValueError):
    """A run cannot move to the requested state from the state it is in."""


def resume_advice(job_id: str, first: str | None = None) -> str:
    """The one way every message says that a stopped job loses nothing and how to finish it
    (``first``: what to do before resuming, such as "free space")."""
    then = f"{first}, then " if first else ""
    return f"every finished run is kept: {then}`cbpo-orch resume {job_id}` finishes the job"


class LeaseHeld(RuntimeError):
    """Another live driver holds the job's lease: this one may not run the job."""

    def __init__(self, job_id: str, owner: str | None, seconds_left: float) -> None:
        super().__init__(job_id, owner, seconds_left)
        self.job_id, self.owner, self.seconds_left = job_id, owner, seconds_left

    def __str__(self) -> str:
        return (
            f"job {self.job_id} is being run by another driver ({self.owner}); wait for it to finish, "
            f"or if it has died, `cbpo-orch resume {self.job_id}` can take over once its lease expires "
            f"(in {max(self.seconds_left, 0):.0f} s without a heartbeat)"
        )


@dataclass(frozen=True)
class JobInfo:
    """A job as stored, with the number of its runs in each state."""

    job_id: str
    task: str
    methods: list[str]
    users: list[str]
    config: dict[str, Any]
    state: str
    created_at: str
    finished_at: str | None
    error: str | None
    counts: dict[str, int]
    line_id: str = ""
    """The submitted job whose line of updates this job belongs to (its own id for that job)."""
    parent_job_id: str | None = None
    """The job this one updates; None for a submitted job."""
    promote: str | None = None


@dataclass(frozen=True)
class RunInfo:
    """One (user, method) run of a job."""

    run_id: int
    job_id: str
    user_id: str
    method: str
    state: str
    attempts: int
    error: str | None
    data_fingerprint: str | None = None
    """The digest of the user's history items the run read (see ``orchestrator/fingerprint.py``)."""
    n_items: int | None = None
    source_run_id: int | None = None
    """A run an update carried over: the run whose adapter and metrics it refers to."""


class Registry:
    """Access to the registry database at a SQLAlchemy ``url``.

    Opening creates missing tables and checks the schema version (see
    :mod:`cbpo_orch.storage.schema`).  Several processes may share one SQLite
    file: writes take the lock at ``BEGIN`` and are retried when it is busy.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self._engine = make_engine(url)
        self._writer = writer(self._engine)
        try:
            if not transact(self._engine, lambda session: is_current(session.connection())):
                transact(self._writer, lambda session: prepare_schema(session.connection()))
        except BaseException:
            self._engine.dispose()
            raise

    def close(self) -> None:
        """Release every pooled database connection."""
        self._engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create_job(
        self,
        task: str,
        methods: Sequence[str],
        users: Sequence[str],
        config: Mapping[str, Any],
    ) -> str:
        """Create a pending job and one pending run per (user, method); return the job id."""
        methods = _distinct_names("methods", methods)
        users = _distinct_names("users", users)
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, not {type(config).__name__}")
        job_id = uuid.uuid4().hex[:12]

        def work(session: Session) -> None:
            session.add(
                Job(job_id=job_id, task=task, methods=methods, users=users, config=dict(config))
            )
            session.flush()
            session.add(DriverLease(job_id=job_id))
            session.add_all(
                UserRun(job_id=job_id, user_id=user, method=method)
                for user in users
                for method in methods
            )

        transact(self._writer, work)
        return job_id

    def job(self, job_id: str) -> JobInfo:
        """Return the job ``job_id``; raise :class:`UnknownJob` if there is none."""

        def work(session: Session) -> JobInfo:
            job = _get_job(session, job_id)
            return _job_info(job, _run_counts(session, job_id).get(job_id, {}))

        return transact(self._engine, work)

    def jobs(self) -> list[JobInfo]:
        """Return every job, newest first."""

        def work(session: Session) -> list[JobInfo]:
            counts = _run_counts(session)
            found = session.scalars(select(Job).order_by(Job.created_at.desc(), Job.job_id))
            return [_job_info(job, counts.get(job.job_id, {})) for job in found]

        return transact(self._engine, work)

    def runs(self, job_id: str, states: Iterable[str] | None = None) -> list[RunInfo]:
        """Return the runs of ``job_id``, only those in ``states`` if given, by user then method."""
        wanted = None if states is None else _checked_states(states, RUN_STATES, "run")

        def work(session: Session) -> list[RunInfo]:
            _get_job(session, job_id)
            query = select(UserRun).where(UserRun.job_id == job_id)
            if wanted is not None:
                query = query.where(UserRun.state.in_(wanted))
            query = query.order_by(UserRun.user_id, UserRun.method)
            return [_run_info(run) for run in session.scalars(query)]

        return transact(self._engine, work)

    def mark_running(self, run_id: int) -> RunInfo:
        """Start an attempt of a pending run (or of one left running by a crash).

        Increments ``attempts`` and sets ``started_at``.  Raises
        :class:`InvalidTransition` for a succeeded, failed or cancelled run.
        """

        def work(session: Session) -> RunInfo:
            run = _get_run(session, run_id, for_update=True)
            if run.state not in _STARTABLE:
                raise InvalidTransition(
                    f"run {run_id} ({run.user_id}, {run.method}) is {run.state}; "
                    "only a pending run or one left running by a crash can start"
                )
            run.state = "running"
            run.attempts += 1
            run.started_at = utcnow()
            run.finished_at = None
            return _run_info(run)

        return transact(self._writer, work)

    def record_success(
        self,
        run_id: int,
        metrics: Mapping[str, Any],
        adapter: Mapping[str, Any] | None,
        parent: ParentScore | None = None,
    ) -> bool:
        """Store the metrics and adapter of a run and mark it succeeded, in one transaction.

        ``metrics`` needs ``rouge1``, ``rougeL``, ``n_pos``, ``n_aux`` and
        ``seconds`` (the two scores None together, for a user without golds), and may have ``gamma``, ``gamma_reason``,
        ``phase_seconds`` and ``extra``; ``adapter`` needs ``path``, ``sha256``
        and ``bytes``; ``parent``: the current version's ROUGE-1 on the run's items, which
        promotion compares the run's with (``lineage.record_version``).  Idempotent: for a
        run that already succeeded nothing is written and False is returned (True when this
        call recorded it).  The error message of earlier failed attempts, if any, is kept.
        """
        metric_values = _metric_values(metrics)
        adapter_values = None if adapter is None else _adapter_values(adapter)

        def work(session: Session) -> bool:
            run = _get_run(session, run_id, for_update=True)
            if run.state == "succeeded":
                return False
            if run.state not in _STARTABLE:
                raise InvalidTransition(
                    f"run {run_id} ({run.user_id}, {run.method}) is {run.state}; "
                    "its result cannot be recorded"
                )
            session.add(Metric(run_id=run_id, **metric_values))
            if adapter_values is not None:
                session.add(Adapter(run_id=run_id, **adapter_values))
                lineage.record_version(session, run, metric_values["rouge1"], parent)
            run.state = "succeeded"
            run.finished_at = utcnow()
            return True

        try:
            return transact(self._writer, work)
        except IntegrityError:
            if self._run_state(run_id) == "succeeded":
                return False
            raise

    def record_failure(self, run_id: int, error: str, final: bool) -> bool:
        """Record a failed attempt of a run; return False if the run was no longer active.

        ``final`` marks the run failed for good; otherwise it goes back to
        pending to be retried.  The reason is kept in both cases.  A run that
        already succeeded, failed or was cancelled is left untouched.
        """

        def work(session: Session) -> bool:
            run = _get_run(session, run_id, for_update=True)
            if run.state not in _STARTABLE:
                return False
            run.error = error
            if final:
                run.state = "failed"
                run.finished_at = utcnow()
            else:
                run.state = "pending"
            return True

        return transact(self._writer, work)

    def set_job_state(self, job_id: str, state: str, error: str | None = None) -> None:
        """Set the state and error of a job; final states also set ``finished_at``."""
        _checked_states([state], JOB_STATES, "job")

        def work(session: Session) -> None:
            job = _get_job(session, job_id, for_update=True)
            job.state = state
            job.error = error
            job.finished_at = utcnow() if state in FINAL_JOB_STATES else None

        transact(self._writer, work)

    def reset_interrupted(self, job_id: str) -> int:
        """Send the runs of ``job_id`` left running (by a dead driver) back to pending.

        Returns how many runs were reset; their attempt counts are kept.
        """

        def work(session: Session) -> int:
            _get_job(session, job_id, for_update=True)
            result = session.execute(
                update(UserRun)
                .where(UserRun.job_id == job_id, UserRun.state == "running")
                .values(state="pending")
            )
            return result.rowcount

        return transact(self._writer, work)

    def cancel(self, job_id: str) -> int:
        """Cancel a job: its pending runs become cancelled and the job cancelled.

        Running runs are left to finish.  A job already succeeded, failed or
        cancelled is left untouched.  Returns how many runs were cancelled.
        """

        def work(session: Session) -> int:
            job = _get_job(session, job_id, for_update=True)
            if job.state in FINAL_JOB_STATES:
                return 0
            now = utcnow()
            result = session.execute(
                update(UserRun)
                .where(UserRun.job_id == job_id, UserRun.state == "pending")
                .values(state="cancelled", finished_at=now)
            )
            job.state = "cancelled"
            job.finished_at = now
            return result.rowcount

        return transact(self._writer, work)

    def results(self, job_id: str) -> list[dict[str, Any]]:
        """Return one row per succeeded (user, method) of a job, keyed by ``RESULT_COLUMNS``;
        a run an update carried over shows the result it refers to.

        Rows are sorted by user id then method (string order).  ``adapter_path``
        and ``sha256`` are None for a run recorded without an adapter, ``rouge1``
        and ``rougeL`` for a user without gold outputs (nothing to score against).
        """

        def work(session: Session) -> list[dict[str, Any]]:
            _get_job(session, job_id)
            query = (
                select(
                    UserRun.user_id,
                    UserRun.method,
                    Metric.rouge1,
                    Metric.rougeL,
                    Metric.gamma,
                    Metric.n_pos,
                    Metric.n_aux,
                    Adapter.path.label("adapter_path"),
                    Adapter.sha256,
                    Metric.seconds,
                )
                .join(Metric, Metric.run_id == lineage.RESULT_RUN_ID)
                .outerjoin(Adapter, Adapter.run_id == lineage.RESULT_RUN_ID)
                .where(UserRun.job_id == job_id, UserRun.state == "succeeded")
                .order_by(UserRun.user_id, UserRun.method)
            )
            return [dict(row._mapping) for row in session.execute(query)]

        return transact(self._engine, work)

    def extras(self, job_id: str) -> dict[tuple[str, str], dict[str, Any]]:
        """The ``extra`` metrics (losses, selection, predictions) of each succeeded
        (user, method) of a job."""

        def work(session: Session) -> dict[tuple[str, str], dict[str, Any]]:
            _get_job(session, job_id)
            query = (
                select(UserRun.user_id, UserRun.method, Metric.extra)
                .join(Metric, Metric.run_id == lineage.RESULT_RUN_ID)
                .where(UserRun.job_id == job_id, UserRun.state == "succeeded")
            )
            return {(user, method): extra or {} for user, method, extra in session.execute(query)}

        return transact(self._engine, work)

    def task_adapter(self, key: str) -> dict[str, Any] | None:
        """Return the cached task adapter stored under ``key``, or None."""

        def work(session: Session) -> dict[str, Any] | None:
            found = session.scalar(select(TaskAdapter).where(TaskAdapter.key == key))
            return None if found is None else _task_adapter_dict(found)

        return transact(self._engine, work)

    def record_task_adapter(
        self, key: str, task: str, model: str, path: str, sha256: str, bytes: int
    ) -> dict[str, Any]:
        """Cache a task adapter under ``key`` and return the cached entry.

        The first entry recorded for a key wins: if one exists already it is
        returned unchanged.
        """

        def work(session: Session) -> dict[str, Any]:
            found = session.scalar(select(TaskAdapter).where(TaskAdapter.key == key))
            if found is None:
                found = TaskAdapter(
                    key=key,
                    task=task,
                    model=model,
                    path=str(path),
                    sha256=sha256,
                    bytes=int(bytes),
                )
                session.add(found)
                session.flush()
            return _task_adapter_dict(found)

        try:
            return transact(self._writer, work)
        except IntegrityError:
            existing = self.task_adapter(key)
            if existing is None:
                raise
            return existing

    def record_inputs(self, inputs: Mapping[int, RunInputs]) -> None:
        """Store what each run (by id) reads of its user's data: its data fingerprint, number
        of items and aux users (see :class:`~cbpo_orch.storage.lineage.RunInputs`)."""
        transact(self._writer, lambda session: lineage.record_inputs(session, inputs))

    def update_basis(self, job_id: str) -> dict[tuple[str, str], Basis]:
        """Per (user, method) of ``job_id``: what an update of it starts from."""
        return transact(self._engine, lambda session: lineage.update_basis(session, _get_job(session, job_id)))

    def incumbents(self, job_id: str) -> dict[tuple[str, str], Incumbent]:
        """Per (user, method) with a current version in ``job_id``'s line: the version a new one
        that the job trains is compared with (none where the job promotes unchecked)."""
        return transact(self._engine, lambda session: lineage.incumbents(session, _get_job(session, job_id)))

    def create_update(self, parent_id: str, config: Mapping[str, Any], planned: Sequence[PlannedRun], promote: str) -> str:
        """Create a job updating ``parent_id`` in its line: a pending run for each planned run
        that trains, a succeeded run referring to its source for each one carried; returns its id."""
        if promote not in PROMOTE_POLICIES:
            raise ValueError(f"promote must be one of {PROMOTE_POLICIES}, not {promote!r}")
        if not planned:
            raise ValueError("an update needs at least one run")
        job_id = uuid.uuid4().hex[:12]

        def work(session: Session) -> None:
            lineage.add_update(session, _get_job(session, parent_id), job_id, dict(config), list(planned), promote)
            session.add(DriverLease(job_id=job_id))

        transact(self._writer, work)
        return job_id

    def versions(self, job_id: str, user_id: str | None = None) -> list[dict[str, Any]]:
        """Every adapter version in ``job_id``'s line (of one user, if given), keyed by
        ``lineage.VERSION_COLUMNS``."""

        def work(session: Session) -> list[dict[str, Any]]:
            rows = lineage.versions(session, _get_job(session, job_id), user_id)
            return [{**row, "created_at": _iso(row["created_at"])} for row in rows]

        return transact(self._engine, work)

    def served(self, job_id: str, method: str) -> list[dict[str, Any]]:
        """What a server of ``job_id``'s line answers with for ``method``: per user, its
        current version or its latest run's state, keyed by ``lineage.SERVED_COLUMNS``."""
        return transact(self._engine, lambda session: lineage.served(session, _get_job(session, job_id), method))

    def rollback(self, job_id: str, user_id: str, methods: Sequence[str] | None = None) -> list[tuple[str, int, int]]:
        """Make the previous version of ``user_id``'s current adapters (every method of the
        job, or ``methods``) in ``job_id``'s line current again; returns (method, from, to)."""

        def work(session: Session) -> list[tuple[str, int, int]]:
            job = _get_job(session, job_id)
            return lineage.rollback(session, job, user_id, list(methods or job.methods))

        return transact(self._writer, work)

    def forget(self, user_id: str, job_id: str | None = None) -> Forgotten:
        """Delete every row of ``user_id`` (only in ``job_id``'s line, if given); see
        :func:`~cbpo_orch.storage.lineage.forget`."""

        def work(session: Session) -> Forgotten:
            line = None if job_id is None else lineage.line_of(_get_job(session, job_id))
            return lineage.forget(session, user_id, line)

        return transact(self._writer, work)

    def erase_freed(self) -> bool:
        """Leave no deleted row's bytes in a SQLite registry's files: rebuild the database
        (``VACUUM``: its free pages kept what deleted rows held) and empty its write-ahead log,
        each waiting for other connections up to the busy timeout. False when the log could not
        be emptied (another connection kept reading). PostgreSQL reclaims deleted rows with its
        own ``VACUUM FULL``, which its operator runs."""
        if self._engine.dialect.name != "sqlite":
            return True
        raw = self._engine.raw_connection()
        try:
            raw.driver_connection.execute("VACUUM")
            busy, _, _ = raw.driver_connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            raw.close()
        return busy == 0

    def audit(self, actor: str, action: str, subject: str, detail: Mapping[str, Any]) -> None:
        """Append a line to the audit log (it must hold no user content)."""
        transact(self._writer, lambda session: session.add(AuditEntry(actor=actor, action=action, subject=subject, detail=dict(detail))))

    def audit_log(self) -> list[dict[str, Any]]:
        """Every audit line, oldest first."""

        def work(session: Session) -> list[dict[str, Any]]:
            entries = session.scalars(select(AuditEntry).order_by(AuditEntry.id))
            return [{"at": _iso(e.at), "actor": e.actor, "action": e.action, "subject": e.subject, "detail": e.detail} for e in entries]

        return transact(self._engine, work)

    def take_lease(self, job_id: str, owner: str, ttl_s: float, replacing: str | None = None) -> None:
        """Make ``owner`` the job's one driver for ``ttl_s`` seconds, if the lease is free,
        expired, already its own, or held by ``replacing`` (a driver known to be dead);
        otherwise raise :class:`LeaseHeld`. Of several drivers racing for one lease,
        exactly one gets it (one conditional update)."""
        if not self._claim(job_id, owner, ttl_s, takeover=True, replacing=replacing):
            lease = self.lease(job_id)
            raise LeaseHeld(job_id, lease["owner"], lease["seconds_left"])
    def renew_lease(self, job_id: str, owner: str, ttl_s: float) -> bool:
        """Extend ``owner``'s lease by ``ttl_s`` from now (its heartbeat); False when the
        lease is no longer its own (it expired and another driver took the job over)."""
        return self._claim(job_id, owner, ttl_s, takeover=False)

    def release_lease(self, job_id: str, owner: str) -> None:
        """Free the job's lease if ``owner`` still holds it (a driver that ends)."""

        def work(session: Session) -> None:
            session.execute(
                update(DriverLease)
                .where(DriverLease.job_id == job_id, DriverLease.owner == owner)
                .values(owner=None, expires_at=FREE_LEASE, notice=None)
            )

        transact(self._writer, work)

    def set_lease_notice(self, job_id: str, owner: str, notice: str) -> None:
        """Record where to watch the job (the dashboard line) while ``owner`` holds its lease."""

        def work(session: Session) -> None:
            session.execute(update(DriverLease).where(DriverLease.job_id == job_id, DriverLease.owner == owner).values(notice=notice))

        transact(self._writer, work)

    def lease(self, job_id: str) -> dict[str, Any]:
        """The job's lease: its ``owner`` (None when free), ``seconds_left`` until it expires,
        and the ``notice`` its owner recorded (where to watch the job; None without one)."""

        def work(session: Session) -> dict[str, Any]:
            _get_job(session, job_id)
            lease = session.get(DriverLease, job_id)
            return {"owner": lease.owner, "seconds_left": (_aware(lease.expires_at) - utcnow()).total_seconds(), "notice": lease.notice}

        return transact(self._engine, work)

    def _claim(self, job_id: str, owner: str, ttl_s: float, takeover: bool, replacing: str | None = None) -> bool:
        def work(session: Session) -> bool:
            _get_job(session, job_id)
            now = utcnow()
            allowed = [DriverLease.owner == owner]
            if takeover:
                allowed += [DriverLease.expires_at < now] + ([DriverLease.owner == replacing] if replacing else [])
            result = session.execute(
                update(DriverLease)
                .where(DriverLease.job_id == job_id, or_(*allowed))
                .values(owner=owner, expires_at=now + timedelta(seconds=ttl_s), renewed_at=now)
            )
            return result.rowcount == 1

        return transact(self._writer, work)

    def _run_state(self, run_id: int) -> str:
        """Return the current state of a run."""
        return transact(self._engine, lambda session: _get_run(session, run_id).state)


def _get_job(session: Session, job_id: str, for_update: bool = False) -> Job:
    """Load a job (locking its row if ``for_update``), or raise :class:`UnknownJob`."""
    job = session.get(Job, job_id, with_for_update=for_update)
    if job is None:
        raise UnknownJob(job_id)
    return job


def _get_run(session: Session, run_id: int, for_update: bool = False) -> UserRun:
    """Load a run (locking its row if ``for_update``), or raise :class:`UnknownRun`."""
    run = session.get(UserRun, run_id, with_for_update=for_update)
    if run is None:
        raise UnknownRun(run_id)
    return run


def _run_counts(session: Session, job_id: str | None = None) -> dict[str, dict[str, int]]:
    """Count runs per job and state, for one job or for all of them."""
    query = select(UserRun.job_id, UserRun.state, func.count()).group_by(
        UserRun.job_id, UserRun.state
    )
    if job_id is not None:
        query = query.where(UserRun.job_id == job_id)
    counts: dict[str, dict[str, int]] = {}
    for owner, state, number in session.execute(query):
        counts.setdefault(owner, {})[state] = number
    return counts


def _job_info(job: Job, counts: Mapping[str, int]) -> JobInfo:
    """Convert a job row and its run counts to a :class:`JobInfo`."""
    shown = {state: counts.get(state, 0) for state in COUNTED_STATES}
    if counts.get("cancelled"):
        shown["cancelled"] = counts["cancelled"]
    return JobInfo(
        job_id=job.job_id,
        task=job.task,
        methods=list(job.methods),
        users=list(job.users),
        config=dict(job.config),
        state=job.state,
        created_at=_iso(job.created_at),
        finished_at=None if job.finished_at is None else _iso(job.finished_at),
        error=job.error,
        counts=shown,
        line_id=lineage.line_of(job),
        parent_job_id=job.parent_job_id,
        promote=job.promote,
    )


def _run_info(run: UserRun) -> RunInfo:
    """Convert a run row to a :class:`RunInfo`."""
    return RunInfo(
        run_id=run.id,
        job_id=run.job_id,
        user_id=run.user_id,
        method=run.method,
        state=run.state,
        attempts=run.attempts,
        error=run.error,
        data_fingerprint=run.data_fingerprint,
        n_items=run.n_items,
        source_run_id=run.source_run_id,
    )


def _task_adapter_dict(entry: TaskAdapter) -> dict[str, Any]:
    """Convert a task-adapter row to a plain dict."""
    return {
        "key": entry.key,
        "task": entry.task,
        "model": entry.model,
        "path": entry.path,
        "sha256": entry.sha256,
        "bytes": entry.bytes,
        "created_at": _iso(entry.created_at),
    }


def _aware(moment: datetime) -> datetime:
    """A stored timestamp as an aware UTC datetime: SQLite returns it naive (in UTC),
    PostgreSQL in the session's time zone."""
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def _iso(moment: datetime) -> str:
    """Format a stored timestamp as ISO 8601 in UTC."""
    return _aware(moment).isoformat()


def _distinct_names(field: str, values: Sequence[str]) -> list[str]:
    """Check that ``values`` is a non-empty sequence of distinct non-empty strings."""
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(f"{field} must be a list of strings")
    names = list(values)
    if not names:
        raise ValueError(f"{field} must not be empty")
    bad = [name for name in names if not isinstance(name, str) or not name]
    if bad:
        raise TypeError(f"{field} must be non-empty strings, got {bad[:5]!r}")
    duplicates = sorted(name for name, seen in Counter(names).items() if seen > 1)
    if duplicates:
        raise ValueError(f"{field} has duplicates: {duplicates[:5]!r}")
    return names


def _checked_states(states: Iterable[str], allowed: tuple[str, ...], kind: str) -> list[str]:
    """Check that every state is one of ``allowed``."""
    checked = list(states)
    unknown = [state for state in checked if state not in allowed]
    if unknown:
        raise ValueError(f"unknown {kind} state(s) {unknown!r}; expected one of {allowed}")
    return checked


def _metric_values(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a metrics mapping and convert it to :class:`Metric` column values."""
    required = _FLOAT_METRICS + _INT_METRICS
    unknown = sorted(set(metrics) - set(required) - set(_OPTIONAL_METRICS))
    missing = [name for name in required if name not in metrics or (metrics[name] is None and name not in _SCORES)]
    if unknown or missing:
        raise ValueError(f"bad metrics: missing {missing}, unknown {unknown}")
    if (metrics["rouge1"] is None) != (metrics["rougeL"] is None):
        raise ValueError("bad metrics: rouge1 and rougeL must both be scores or both None (a user without golds)")
    values: dict[str, Any] = {name: None if metrics[name] is None else float(metrics[name]) for name in _FLOAT_METRICS}
    values.update({name: int(metrics[name]) for name in _INT_METRICS})
    gamma = metrics.get("gamma")
    values["gamma"] = None if gamma is None else float(gamma)
    values["gamma_reason"] = metrics.get("gamma_reason")
    values["phase_seconds"] = dict(metrics.get("phase_seconds") or {})
    values["extra"] = metrics.get("extra")
    return values


def _adapter_values(adapter: Mapping[str, Any]) -> dict[str, Any]:
    """Validate an adapter mapping (``path``, ``sha256``, ``bytes``) into column values."""
    if set(adapter) != set(_ADAPTER_KEYS):
        raise ValueError(f"adapter needs exactly the keys {_ADAPTER_KEYS}, got {sorted(adapter)}")
    return {
        "path": str(adapter["path"]),
        "sha256": str(adapter["sha256"]),
        "bytes": int(adapter["bytes"]),
    }
