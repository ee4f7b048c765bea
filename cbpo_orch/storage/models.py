"""ORM models of the registry database (SQLAlchemy 2.0 typed declarative).

Every timestamp is stored in UTC.  States are plain strings guarded by CHECK
constraints; the allowed values are the tuples below.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 5
"""Version of the schema these models describe; bump it with a migration."""

FREE_LEASE = datetime(1970, 1, 1, tzinfo=timezone.utc)
"""``DriverLease.expires_at`` of a lease no driver holds."""

JOB_STATES = ("pending", "running", "succeeded", "failed", "cancelled", "interrupted")
RUN_STATES = ("pending", "running", "succeeded", "failed", "cancelled")
VERSION_STATES = ("current", "superseded", "rejected", "rolled-back")
PROMOTE_POLICIES = ("check", "always")


def utcnow() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(timezone.utc)


def _in(column: str, values: tuple[str, ...]) -> str:
    """Build the SQL text of a CHECK constraint limiting ``column`` to ``values``."""
    quoted = ", ".join(f"'{value}'" for value in values)
    return f"{column} IN ({quoted})"


class Base(DeclarativeBase):
    """Declarative base of every registry table."""

    type_annotation_map = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
        list[str]: JSON,
    }


class SchemaVersion(Base):
    """The single row recording which schema version the database holds."""

    __tablename__ = "schema_version"
    __table_args__ = (CheckConstraint("id = 1", name="ck_schema_version_single_row"),)

    id: Mapped[int] = mapped_column(primary_key=True, default=1)
    version: Mapped[int] = mapped_column(Integer)


class Job(Base):
    """A personalization job: one task, several methods, several users."""

    __tablename__ = "jobs"
    __table_args__ = (CheckConstraint(_in("state", JOB_STATES), name="ck_jobs_state"),)

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    task: Mapped[str] = mapped_column(String(200))
    methods: Mapped[list[str]]
    users: Mapped[list[str]]
    config: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    parent_job_id: Mapped[str | None] = mapped_column(String(32))
    """The job this one updates (``cbpo-orch update``); None for a submitted job."""
    line_id: Mapped[str | None] = mapped_column(String(32))
    """The submitted job that the line of updates this job belongs to started from; None: it is that job."""
    promote: Mapped[str | None] = mapped_column(String(16))
    """An update's promotion policy (``PROMOTE_POLICIES``); None for a submitted job."""


class DriverLease(Base):
    """Which driver runs a job: the one whose lease has not expired (it renews it while
    it lives). One row per job, made with the job; a free lease has no owner."""

    __tablename__ = "driver_leases"

    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id"), primary_key=True)
    owner: Mapped[str | None] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(default=FREE_LEASE)
    renewed_at: Mapped[datetime | None]
    notice: Mapped[str | None] = mapped_column(Text)
    """Where to watch the owner's job: the Ray dashboard line it printed."""


class UserRun(Base):
    """Training and evaluation of one adapter for one (user, method) of a job."""

    __tablename__ = "user_runs"
    __table_args__ = (
        UniqueConstraint("job_id", "user_id", "method", name="uq_user_runs_job_user_method"),
        CheckConstraint(_in("state", RUN_STATES), name="ck_user_runs_state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.job_id"), index=True)
    user_id: Mapped[str] = mapped_column(String(200))
    method: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    error: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    data_fingerprint: Mapped[str | None] = mapped_column(String(64))
    """The digest of the user's history items the run read (None: recorded before schema 5)."""
    n_items: Mapped[int | None]
    """How many history items that digest covers."""
    source_run_id: Mapped[int | None]
    """A run an update carried over unchanged: the run whose adapter and metrics it refers to."""


class Adapter(Base):
    """The LoRA adapter artifact of a succeeded run (at most one per run)."""

    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("user_runs.id"), unique=True)
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Metric(Base):
    """The evaluation metrics and timings of a succeeded run (one row per run)."""

    __tablename__ = "metrics"

    id: Mapped[int] = mapped_column(primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("user_runs.id"), unique=True)
    rouge1: Mapped[float | None] = mapped_column(Float)  # None: the user had no gold output to score against
    rougeL: Mapped[float | None] = mapped_column(Float)
    gamma: Mapped[float | None] = mapped_column(Float)
    gamma_reason: Mapped[str | None] = mapped_column(Text)
    n_pos: Mapped[int]
    n_aux: Mapped[int]
    seconds: Mapped[float] = mapped_column(Float)
    phase_seconds: Mapped[dict[str, Any]]
    extra: Mapped[dict[str, Any] | None]


class TaskAdapter(Base):
    """Cache entry of a task adapter (TAM), keyed by a hash of its inputs."""

    __tablename__ = "task_adapters"

    id: Mapped[int] = mapped_column(primary_key=True)
    key: Mapped[str] = mapped_column(String(128), unique=True)
    task: Mapped[str] = mapped_column(String(200))
    model: Mapped[str] = mapped_column(String(500))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    bytes: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AdapterVersion(Base):
    """One version of a (user, method)'s adapter in a line of jobs (a submitted job and its
    updates): the run that trained it, the version it was compared with, and the outcome."""

    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("line_id", "user_id", "method", "number", name="uq_adapter_versions_number"),
        CheckConstraint(_in("state", VERSION_STATES), name="ck_adapter_versions_state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    line_id: Mapped[str] = mapped_column(String(32), index=True)
    user_id: Mapped[str] = mapped_column(String(200), index=True)
    method: Mapped[str] = mapped_column(String(64))
    number: Mapped[int]
    run_id: Mapped[int] = mapped_column(ForeignKey("user_runs.id"), unique=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id"))
    state: Mapped[str] = mapped_column(String(16))
    score: Mapped[float | None] = mapped_column(Float)
    parent_score: Mapped[float | None] = mapped_column(Float)
    """The score of the version that was current when this one was compared with it."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuxSource(Base):
    """A user whose history items a run trained on as auxiliary items (recorded since schema 5)."""

    __tablename__ = "aux_sources"

    run_id: Mapped[int] = mapped_column(ForeignKey("user_runs.id"), primary_key=True)
    user_id: Mapped[str] = mapped_column(String(200), primary_key=True, index=True)


class AuditEntry(Base):
    """What a lifecycle command removed or changed, without any of the user's content."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict[str, Any]]
