"""A job's line of updates in the registry: carried-over runs, adapter versions and their
promotion, rollback, and forgetting a user. Functions over an open session; the
:class:`~cbpo_orch.storage.registry.Registry` runs each in one transaction.

A submitted job starts a line; ``cbpo-orch update`` adds a job to it whose runs either train
(a new or changed user) or are *carried*: succeeded at once, referring to the run whose adapter
and metrics they reuse (``source_run_id``), so nothing is copied. Every run that records an
adapter becomes the next version of its (user, method) in the line; it is promoted to current
unless the line's policy is ``check`` and its score is below the current version's score on the
same items: the worker that trained it scores the current version's adapter (:func:`incumbents`)
on the prompts and golds it scored the new one on (:class:`ParentScore`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from .models import Adapter, AdapterVersion, AuxSource, Job, Metric, UserRun, utcnow


@dataclass(frozen=True)
class RunInputs:
    """What a run reads of its user's data: the digest of the history items, their number,
    and the users whose items it trains on as auxiliary items."""

    data_fingerprint: str
    n_items: int
    aux_users: tuple[str, ...] = ()


@dataclass(frozen=True)
class Basis:
    """What an update starts from for one (user, method) of a job: its run's state and data
    fingerprint, and the run a carried-over run would refer to (the line's current version,
    or for a method without an adapter the run's own result; None where the run did not
    succeed: it trains again)."""

    state: str
    data_fingerprint: str | None
    n_items: int | None
    carry_run_id: int | None


@dataclass(frozen=True)
class PlannedRun:
    """One (user, method) of an update: trained, or carried from ``carry_run_id``."""

    user_id: str
    method: str
    carry_run_id: int | None = None
    inputs: RunInputs | None = None


@dataclass(frozen=True)
class Incumbent:
    """The current version of a (user, method) that a run of a checking update is compared
    with: its id and its adapter's folder."""

    version_id: int
    adapter_path: str


@dataclass(frozen=True)
class ParentScore:
    """The score of version ``version_id`` (an :class:`Incumbent`) on the items a new version
    of its (user, method) was scored on; None where none of them has a gold."""

    version_id: int
    score: float | None


VERSION_COLUMNS = ("user_id", "method", "version", "state", "job_id", "data_fingerprint", "n_items", "parent", "score", "parent_score", "adapter_path", "created_at")
"""Keys of every row :func:`versions` returns, in order."""


def line_of(job: Job) -> str:
    """The id of the submitted job that ``job``'s line started from."""
    return job.line_id or job.job_id


def result_run(run: UserRun) -> int:
    """The run whose adapter and metrics stand for ``run`` (itself, unless carried)."""
    return run.source_run_id or run.id


RESULT_RUN_ID = func.coalesce(UserRun.source_run_id, UserRun.id)
"""``result_run`` as a column expression, for queries that join a run's metrics and adapter."""


def record_inputs(session: Session, inputs: Mapping[int, RunInputs]) -> None:
    """Store each run's data fingerprint, item count and aux users (replacing earlier ones),
    in a few statements for all runs."""
    if not inputs:
        return
    session.execute(update(UserRun), [{"id": run_id, "data_fingerprint": given.data_fingerprint, "n_items": given.n_items} for run_id, given in inputs.items()])
    session.execute(delete(AuxSource).where(AuxSource.run_id.in_(list(inputs))))
    aux = [{"run_id": run_id, "user_id": user} for run_id, given in inputs.items() for user in sorted(set(given.aux_users))]
    if aux:
        session.execute(insert(AuxSource), aux)


def update_basis(session: Session, job: Job) -> dict[tuple[str, str], Basis]:
    """Per (user, method) of ``job``: what an update of it starts from."""
    current = {
        (user, method): run_id
        for user, method, run_id in session.execute(
            select(AdapterVersion.user_id, AdapterVersion.method, AdapterVersion.run_id)
            .where(AdapterVersion.line_id == line_of(job), AdapterVersion.state == "current")
        )
    }
    basis = {}
    for run in session.scalars(select(UserRun).where(UserRun.job_id == job.job_id)):
        carry = current.get((run.user_id, run.method), result_run(run)) if run.state == "succeeded" else None
        basis[(run.user_id, run.method)] = Basis(run.state, run.data_fingerprint, run.n_items, carry)
    return basis


def incumbents(session: Session, job: Job) -> dict[tuple[str, str], Incumbent]:
    """Per (user, method) with a current version in ``job``'s line: that version, which a
    new version the job trains is compared with; none for a job that promotes unchecked."""
    if job.promote != "check":
        return {}
    rows = session.execute(
        select(AdapterVersion.user_id, AdapterVersion.method, AdapterVersion.id, Adapter.path)
        .join(Adapter, Adapter.run_id == AdapterVersion.run_id)
        .where(AdapterVersion.line_id == line_of(job), AdapterVersion.state == "current")
    )
    return {(user, method): Incumbent(version_id, path) for user, method, version_id, path in rows}


def add_update(session: Session, parent: Job, job_id: str, config: dict[str, Any], planned: list[PlannedRun], promote: str) -> None:
    """Add ``job_id``, an update of ``parent`` in its line, with a pending run for each planned
    run that trains and a succeeded, carried run for each that is carried."""
    users = list(dict.fromkeys(run.user_id for run in planned))
    session.add(Job(
        job_id=job_id, task=parent.task, methods=list(parent.methods), users=users, config=config,
        parent_job_id=parent.job_id, line_id=line_of(parent), promote=promote,
    ))
    session.flush()
    for run in planned:
        carried = run.carry_run_id is not None
        session.add(UserRun(
            job_id=job_id, user_id=run.user_id, method=run.method,
            state="succeeded" if carried else "pending", source_run_id=run.carry_run_id,
            finished_at=utcnow() if carried else None,
            data_fingerprint=run.inputs and run.inputs.data_fingerprint, n_items=run.inputs and run.inputs.n_items,
        ))


def record_version(session: Session, run: UserRun, score: float | None, parent: ParentScore | None = None) -> None:
    """Make the adapter ``run`` just recorded the next version of its (user, method) in its
    job's line, promoted to current unless the line's policy checks it and its ``score`` is
    below the current version's. The current version's score is ``parent``'s, measured on the
    items ``score`` was; where ``parent`` is missing or scored another version (the current one
    changed while the run ran: a rollback, another update), the current version's recorded
    score, on the items it was trained with. Either score missing: promoted, nothing to
    compare. The version keeps the score it was compared with (None under ``always``)."""
    job = session.get(Job, run.job_id)
    line = line_of(job)
    session.get(Job, line, with_for_update=True)  # one promotion at a time per line
    versions = AdapterVersion.__table__.c
    same = (versions.line_id == line, versions.user_id == run.user_id, versions.method == run.method)
    current = session.scalar(select(AdapterVersion).where(*same, AdapterVersion.state == "current"))
    number = (session.scalar(select(func.max(versions.number)).where(*same)) or 0) + 1
    checked = current is not None and job.promote == "check"
    parent_score = None
    if checked:
        parent_score = parent.score if parent is not None and parent.version_id == current.id else current.score
    rejected = checked and score is not None and parent_score is not None and score < parent_score
    if current is not None and not rejected:
        current.state = "superseded"
        session.flush()
    session.add(AdapterVersion(
        line_id=line, user_id=run.user_id, method=run.method, number=number, run_id=run.id,
        parent_id=None if current is None else current.id, state="rejected" if rejected else "current",
        score=score, parent_score=parent_score,
    ))


def versions(session: Session, job: Job, user_id: str | None = None) -> list[dict[str, Any]]:
    """Every version in ``job``'s line (of ``user_id`` only, if given), keyed by
    ``VERSION_COLUMNS``, by user, method and number."""
    parent = AdapterVersion.__table__.alias("parent_version")
    query = (
        select(
            AdapterVersion.user_id, AdapterVersion.method, AdapterVersion.number.label("version"), AdapterVersion.state,
            UserRun.job_id, UserRun.data_fingerprint, UserRun.n_items, parent.c.number.label("parent"),
            AdapterVersion.score, AdapterVersion.parent_score, Adapter.path.label("adapter_path"), AdapterVersion.created_at,
        )
        .join(UserRun, UserRun.id == AdapterVersion.run_id)
        .join(Adapter, Adapter.run_id == AdapterVersion.run_id)
        .outerjoin(parent, parent.c.id == AdapterVersion.parent_id)
        .where(AdapterVersion.line_id == line_of(job))
        .order_by(AdapterVersion.user_id, AdapterVersion.method, AdapterVersion.number)
    )
    if user_id is not None:
        query = query.where(AdapterVersion.user_id == user_id)
    return [dict(row._mapping) for row in session.execute(query)]


SERVED_COLUMNS = ("user_id", "state", "error", "version", "adapter_path", "sha256")
"""Keys of every row :func:`served` returns, in order."""


def served(session: Session, job: Job, method: str) -> list[dict[str, Any]]:
    """What a server of ``job``'s line answers with for ``method``, one row per user of the
    line, by user id, keyed by ``SERVED_COLUMNS``: the user's current version (its number,
    adapter path and sha256; state ``succeeded``), or for a user without one the state and
    error of its latest run (version and adapter None). Two small selects: what a running
    server reads every few seconds."""
    line = line_of(job)
    current = (AdapterVersion.line_id == line, AdapterVersion.method == method, AdapterVersion.state == "current")
    rows = {
        user: {"user_id": user, "state": "succeeded", "error": None, "version": number, "adapter_path": path, "sha256": sha256}
        for user, number, path, sha256 in session.execute(
            select(AdapterVersion.user_id, AdapterVersion.number, Adapter.path, Adapter.sha256)
            .join(Adapter, Adapter.run_id == AdapterVersion.run_id)
            .where(*current)
        )
    }
    for user, state, error in session.execute(
        select(UserRun.user_id, UserRun.state, UserRun.error)
        .where(
            UserRun.job_id.in_(select(Job.job_id).where(or_(Job.job_id == line, Job.line_id == line))),
            UserRun.method == method,
            UserRun.user_id.not_in(select(AdapterVersion.user_id).where(*current)),
        )
        .order_by(UserRun.id)
    ):
        rows[user] = {"user_id": user, "state": state, "error": error, "version": None, "adapter_path": None, "sha256": None}
    return [rows[user] for user in sorted(rows)]


def rollback(session: Session, job: Job, user_id: str, methods: list[str]) -> list[tuple[str, int, int]]:
    """Make the version each current one of ``user_id`` (for ``methods``) replaced current
    again, the replaced one ``rolled-back``; returns (method, from, to) per method rolled
    back. A current version that replaced none is left as it is."""
    session.get(Job, line_of(job), with_for_update=True)
    done = []
    for current in session.scalars(
        select(AdapterVersion).where(
            AdapterVersion.line_id == line_of(job), AdapterVersion.user_id == user_id,
            AdapterVersion.state == "current", AdapterVersion.method.in_(methods),
        ).order_by(AdapterVersion.method)
    ):
        if current.parent_id is None:
            continue
        previous = session.get(AdapterVersion, current.parent_id)
        current.state = "rolled-back"
        session.flush()
        previous.state = "current"
        done.append((current.method, current.number, previous.number))
    return done


@dataclass(frozen=True)
class Forgotten:
    """What :func:`forget` removed from the registry, and what it found of the user elsewhere:
    the jobs that held it, its adapter folders, and the runs of other users that trained on
    its items as auxiliary items (user, method, job)."""

    jobs: list[str]
    adapter_paths: list[str]
    runs: int
    versions: int
    aux_users_of: list[tuple[str, str, str]]


def forget(session: Session, user_id: str, line: str | None) -> Forgotten:
    """Delete every row of ``user_id`` (in ``line``'s jobs only, if given): its versions,
    adapters, metrics, aux records and runs, the rows recording it as another run's aux
    source, and its id from its jobs' user lists and configs."""
    scope = select(Job.job_id)
    if line is not None:
        scope = scope.where(or_(Job.job_id == line, Job.line_id == line))
    runs = select(UserRun.id).where(UserRun.user_id == user_id, UserRun.job_id.in_(scope))
    run_ids = list(session.scalars(runs))
    jobs = sorted(set(session.scalars(select(UserRun.job_id).where(UserRun.id.in_(run_ids)))))
    paths = sorted(set(session.scalars(select(Adapter.path).where(Adapter.run_id.in_(run_ids)))))
    used_by = session.execute(
        select(UserRun.user_id, UserRun.method, UserRun.job_id)
        .join(AuxSource, AuxSource.run_id == UserRun.id)
        .where(AuxSource.user_id == user_id, UserRun.user_id != user_id, UserRun.job_id.in_(scope))
        .order_by(UserRun.job_id, UserRun.user_id, UserRun.method)
    ).all()
    n_versions = session.execute(
        delete(AdapterVersion).where(AdapterVersion.run_id.in_(run_ids)).execution_options(synchronize_session=False)
    ).rowcount
    in_scope = AuxSource.run_id.in_(select(UserRun.id).where(UserRun.job_id.in_(scope)))
    for statement in (
        delete(AuxSource).where(AuxSource.run_id.in_(run_ids) | ((AuxSource.user_id == user_id) & in_scope)),
        delete(Metric).where(Metric.run_id.in_(run_ids)),
        delete(Adapter).where(Adapter.run_id.in_(run_ids)),
        delete(UserRun).where(UserRun.id.in_(run_ids)),
    ):
        session.execute(statement.execution_options(synchronize_session=False))
    for job in session.scalars(select(Job).where(Job.job_id.in_(jobs))):
        job.users = [user for user in job.users if user != user_id]
        job.config = {**job.config, "users": [user for user in job.config.get("users", []) if user != user_id]}
    return Forgotten(jobs, paths, len(run_ids), n_versions, [tuple(row) for row in used_by])
