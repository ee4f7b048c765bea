"""Schema creation, version check and migrations of the registry database."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Connection, func, insert, inspect, literal, select, text, update

from .models import SCHEMA_VERSION, Adapter, AdapterVersion, Base, DriverLease, Job, Metric, SchemaVersion, UserRun

Migration = Callable[[Connection], None]


def _add_driver_leases(connection: Connection) -> None:
    """1 → 2: the driver lease table, with a free lease for every existing job."""
    DriverLease.__table__.create(connection)
    connection.execute(insert(DriverLease).from_select(["job_id"], select(Job.job_id)))


def _add_lease_notice(connection: Connection) -> None:
    """2 → 3: the lease's ``notice`` column (a lease table made by 1 → 2 already has it)."""
    _add_columns(connection, DriverLease, ("notice",))


def _scores_may_be_absent(connection: Connection) -> None:
    """3 → 4: ``metrics.rouge1`` and ``rougeL`` may be NULL (a user without gold outputs).
    PostgreSQL drops the NOT NULL constraints; SQLite, which cannot alter a column, copies
    the table into one made from the current model."""
    table = Metric.__tablename__
    quote = connection.dialect.identifier_preparer.quote
    if connection.dialect.name != "sqlite":
        for column in ("rouge1", "rougeL"):
            connection.execute(text(f"ALTER TABLE {table} ALTER COLUMN {quote(column)} DROP NOT NULL"))
        return
    columns = ", ".join(quote(column["name"]) for column in inspect(connection).get_columns(table))
    connection.execute(text(f"ALTER TABLE {table} RENAME TO {table}_v3"))
    Metric.__table__.create(connection)
    connection.execute(text(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}_v3"))
    connection.execute(text(f"DROP TABLE {table}_v3"))


def _add_lifecycle(connection: Connection) -> None:
    """4 → 5: a run's data fingerprint and carried-over source, a job's line of updates, and the
    adapter versions table, where every adapter an existing run recorded becomes version 1 of
    its (user, method), current, in its job's line (its fingerprint unknown: an update retrains
    it). Columns and the table a database has already (a test's hand-made older schema) are
    kept. The lifecycle's other new tables are made empty by ``create_all``."""
    _add_columns(connection, Job, ("parent_job_id", "line_id", "promote"))
    _add_columns(connection, UserRun, ("data_fingerprint", "n_items", "source_run_id"))
    if inspect(connection).has_table(AdapterVersion.__tablename__):
        return
    AdapterVersion.__table__.create(connection)
    existing = (
        select(UserRun.job_id, UserRun.user_id, UserRun.method, literal(1), UserRun.id, literal("current"), Metric.rouge1, Adapter.created_at)
        .join(Adapter, Adapter.run_id == UserRun.id)
        .outerjoin(Metric, Metric.run_id == UserRun.id)
        .where(UserRun.state == "succeeded")
    )
    columns = ["line_id", "user_id", "method", "number", "run_id", "state", "score", "created_at"]
    connection.execute(insert(AdapterVersion).from_select(columns, existing))


def _add_columns(connection: Connection, model: type, names: tuple[str, ...]) -> None:
    """Add the nullable columns ``names`` of ``model`` to its table, as the model types them;
    a column the table has already is left as it is."""
    table = model.__table__
    quote = connection.dialect.identifier_preparer.quote
    present = {column["name"] for column in inspect(connection).get_columns(table.name)}
    for name in (name for name in names if name not in present):
        column_type = table.columns[name].type.compile(connection.dialect)
        connection.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {quote(name)} {column_type}"))


MIGRATIONS: dict[int, Migration] = {1: _add_driver_leases, 2: _add_lease_notice, 3: _scores_may_be_absent, 4: _add_lifecycle}
"""``MIGRATIONS[v]`` upgrades a database from schema version ``v`` to ``v + 1``."""

SCHEMA_LOCK_KEY = 0x6362706F
"""PostgreSQL advisory lock key that serializes schema preparation (SQLite locks at BEGIN)."""


class SchemaVersionError(RuntimeError):
    """The database's schema version cannot be used by this code."""


def prepare_schema(connection: Connection) -> None:
    """Bring the database on ``connection`` to ``SCHEMA_VERSION``.

    A fresh database gets every table and the version row.  An older one is
    migrated step by step through ``MIGRATIONS``; a newer one raises
    :class:`SchemaVersionError` before anything is changed.  Run this inside a
    transaction so that a failed migration leaves the database untouched.
    """
    if connection.dialect.name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(SCHEMA_LOCK_KEY)))
    found = _stored_version(connection)
    if found is not None and found > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"the registry database has schema version {found}, newer than version "
            f"{SCHEMA_VERSION} known to this cbpo-orch; upgrade cbpo-orch to open it"
        )
    for version in range(found if found is not None else SCHEMA_VERSION, SCHEMA_VERSION):
        migrate = MIGRATIONS.get(version)
        if migrate is None:
            raise SchemaVersionError(
                f"no migration from schema version {version} to {version + 1}; "
                "this registry database cannot be upgraded"
            )
        migrate(connection)
    Base.metadata.create_all(connection)
    if found is None:
        connection.execute(insert(SchemaVersion).values(id=1, version=SCHEMA_VERSION))
    elif found < SCHEMA_VERSION:
        connection.execute(
            update(SchemaVersion).where(SchemaVersion.id == 1).values(version=SCHEMA_VERSION)
        )


def is_current(connection: Connection) -> bool:
    """Whether the database is at ``SCHEMA_VERSION`` already: a read, which never waits for
    a writer, so that opening the registry to read it does not queue behind a busy driver."""
    return _stored_version(connection) == SCHEMA_VERSION


def _stored_version(connection: Connection) -> int | None:
    """Return the version recorded in the database, or None for a fresh one."""
    if not inspect(connection).has_table(SchemaVersion.__tablename__):
        return None
    return connection.scalar(select(SchemaVersion.version).where(SchemaVersion.id == 1))
