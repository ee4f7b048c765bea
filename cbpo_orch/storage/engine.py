"""Engine construction and short, retried transactions.

SQLite gets the settings that let several processes share one file: WAL
journal mode, a busy timeout, foreign keys, and explicit ``BEGIN`` control so
that write transactions can take the write lock up front (``BEGIN IMMEDIATE``)
instead of failing when a read lock cannot be upgraded.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import URL, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session

BUSY_TIMEOUT_S = 30.0
"""How long one SQLite statement waits for a lock before giving up."""

LOCK_RETRIES = 5
"""How many times a transaction is retried after a "database is locked" error."""

_IMMEDIATE = "cbpo_begin_immediate"
_URL_EXAMPLES = "e.g. sqlite:///PATH or postgresql+psycopg://USER@HOST/DB"

T = TypeVar("T")


class RegistryUnavailable(RuntimeError):
    """The registry database at a URL cannot be opened; the message is one line and
    shows the URL without its password."""


def make_engine(url: str) -> Engine:
    """Create an engine for ``url``, configured for multi-process use on SQLite, and
    connect once.

    For a file-based SQLite URL the parent folder is created first.  A URL that does
    not parse, names an unknown dialect or a driver that is not installed, or whose
    database cannot be reached or opened raises :class:`RegistryUnavailable`.
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise RegistryUnavailable(f"the registry URL is not a SQLAlchemy URL ({_URL_EXAMPLES})") from None
    shown = parsed.render_as_string(hide_password=True)
    try:
        engine = _create_engine(parsed)
    except NoSuchModuleError:
        raise RegistryUnavailable(f"registry URL {shown}: unknown database dialect {parsed.drivername!r} ({_URL_EXAMPLES})") from None
    except ImportError as error:
        hint = "; pip install 'cbpo-orch[postgres]' and use a postgresql+psycopg:// URL" if parsed.get_backend_name() == "postgresql" else ""
        raise RegistryUnavailable(f"registry URL {shown}: its database driver is not installed ({error}){hint}") from None
    except OSError as error:
        raise RegistryUnavailable(f"cannot open the registry at {shown}: {error}") from None

    def connect() -> None:
        with engine.connect():
            pass

    try:
        # Two processes opening a fresh SQLite file at once: switching it to WAL can report
        # "locked" at once instead of waiting, so a locked open is tried again.
        _retry_when_locked(connect)
    except DBAPIError as error:
        engine.dispose()
        reason = str(error.orig).strip().partition("\n")[0]
        raise RegistryUnavailable(f"cannot open the registry at {shown}: {reason}") from None
    return engine


def _create_engine(parsed: URL) -> Engine:
    """The engine for ``parsed``; SQLite gets its multi-process settings."""
    if parsed.get_backend_name() != "sqlite":
        return create_engine(parsed, pool_pre_ping=True, json_serializer=dump_json)
    database = parsed.database or ""
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        parsed, connect_args={"timeout": BUSY_TIMEOUT_S}, json_serializer=dump_json
    )
    event.listen(engine, "connect", _configure_sqlite_connection)
    event.listen(engine, "begin", _begin_sqlite_transaction)
    return engine


def writer(engine: Engine) -> Engine:
    """Return a view of ``engine`` whose transactions take the write lock at BEGIN."""
    return engine.execution_options(**{_IMMEDIATE: True})


def transact(engine: Engine, work: Callable[[Session], T]) -> T:
    """Run ``work(session)`` in one transaction, committed on success.

    ``work`` may run more than once: when the database reports that it is
    locked (SQLite), or aborted the transaction as a deadlock's victim or a
    serialization failure (PostgreSQL), the whole transaction is rolled back and
    retried with jittered backoff, up to ``LOCK_RETRIES`` times.
    """
    def once() -> T:
        with Session(engine, expire_on_commit=False) as session, session.begin():
            return work(session)

    return _retry_when_locked(once)


def _retry_when_locked(action: Callable[[], T]) -> T:
    """Run ``action``; when the database reports it locked or aborted it as transient
    (:func:`_is_transient`), run it again with jittered backoff, up to ``LOCK_RETRIES`` times."""
    attempt = 0
    while True:
        try:
            return action()
        except OperationalError as exc:
            if attempt == LOCK_RETRIES or not _is_transient(exc):
                raise
            time.sleep(random.uniform(0.05, 0.2) * (2**attempt))
            attempt += 1


def dump_json(value: Any) -> str:
    """Serialize a JSON column value; numpy scalars and arrays become plain numbers and lists."""
    return json.dumps(value, default=_plain)


def _plain(value: Any) -> Any:
    """Convert an object ``json`` cannot encode through its ``tolist`` method (numpy)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
"""PostgreSQL's serialization_failure and deadlock_detected: the server rolled the
transaction back, and running it again is the documented answer."""


def _is_transient(exc: OperationalError) -> bool:
    """Tell whether ``exc`` is SQLite's "database is locked/busy" or a PostgreSQL
    transaction abort that a retry resolves."""
    if getattr(exc.orig, "sqlstate", None) in RETRYABLE_SQLSTATES:
        return True
    message = str(exc.orig).lower()
    return "database is locked" in message or "database is busy" in message


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    """Set the per-connection SQLite pragmas and hand BEGIN control to SQLAlchemy."""
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def _begin_sqlite_transaction(connection: Any) -> None:
    """Emit BEGIN, or BEGIN IMMEDIATE on engines made by :func:`writer`."""
    immediate = connection.get_execution_options().get(_IMMEDIATE, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
