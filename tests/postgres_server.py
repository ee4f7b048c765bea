"""A throwaway PostgreSQL server for the tests: one per session, one fresh database per test;
and ``db_url``, an empty registry database on SQLite and on that server, for the tests
that must hold on both.

The server runs from the installed Debian binaries (``/usr/lib/postgresql/*/bin``) on a
free loopback port, with trust authentication and fsync off.  ``initdb`` refuses to run
as root, so under root the server runs as the ``postgres`` OS user.  Its time zone is
deliberately not UTC, so that code assuming the database returns UTC times fails.
Everything is skipped, with the reason, where the binaries, ``runuser`` or psycopg are
missing.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

HOST = "127.0.0.1"
SERVER_TIMEZONE = "Asia/Kolkata"
"""A fixed +05:30 offset, far from UTC and without daylight saving time."""


@dataclass(frozen=True)
class PostgresServer:
    """A running server: where it listens and how to run an admin statement on it."""

    port: int

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of ``database`` on this server."""
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/{database}"

    def execute(self, statement: str) -> None:
        """Run ``statement`` outside a transaction on the ``postgres`` database."""
        import psycopg

        with psycopg.connect(
            host=HOST, port=self.port, user="postgres", dbname="postgres", autocommit=True
        ) as connection:
            connection.execute(statement)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """Start the server once for the session and stop it (only it) at the end."""
    pytest.importorskip("psycopg", reason="psycopg is not installed (pip install '.[postgres]')")
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.skip("no PostgreSQL in /usr/lib/postgresql/*/bin (apt-get install postgresql)")
    bin_dir = found[-1].parent
    as_postgres = _as_postgres_user()
    folder = Path(tempfile.mkdtemp(prefix="cbpo-postgres-"))
    data, log = folder / "data", folder / "server.log"
    if as_postgres:
        shutil.chown(folder, "postgres", "postgres")
    port = _free_port()
    options = (
        f"-c listen_addresses={HOST} -p {port} -c unix_socket_directories={folder} "
        "-c fsync=off -c full_page_writes=off -c synchronous_commit=off "
        f"-c timezone={SERVER_TIMEZONE}"
    )
    try:
        initdb = ["-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"]
        _run(as_postgres, bin_dir / "initdb", *initdb)
        start = ["-D", data, "-l", log, "-o", options, "-w", "start"]
        _run(as_postgres, bin_dir / "pg_ctl", *start, log=log)
        yield PostgresServer(port)
    finally:
        if (data / "postmaster.pid").exists():
            _run(as_postgres, bin_dir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh empty database, dropped after the test."""
    name = f"test_{uuid.uuid4().hex}"
    postgres_server.execute(f"CREATE DATABASE {name}")
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """The URL of a fresh SQLite registry file (in a folder that does not exist yet)."""
    return f"sqlite:///{tmp_path / 'nested' / 'registry.sqlite'}"


@pytest.fixture(params=["sqlite_url", "postgres_url"], ids=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> str:
    """An empty registry database on each backend."""
    return request.getfixturevalue(request.param)


def _as_postgres_user() -> list[str]:
    """The command prefix that runs a program as ``postgres`` under root; empty otherwise."""
    if os.geteuid() != 0:
        return []
    if shutil.which("runuser") is None:
        pytest.skip("running as root and runuser is missing: initdb refuses to run as root")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no postgres OS user to run initdb as")
    return ["runuser", "-u", "postgres", "--"]


def _run(prefix: list[str], *command: object, log: Path | None = None) -> None:
    """Run ``command`` after ``prefix``; on failure raise with its output (and ``log``)."""
    done = subprocess.run([*prefix, *map(str, command)], capture_output=True, text=True)
    if done.returncode != 0:
        server_log = log.read_text() if log is not None and log.exists() else ""
        raise RuntimeError(
            f"{Path(str(command[0])).name} failed ({done.returncode}):\n"
            f"{done.stdout}{done.stderr}{server_log}"
        )


def _free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]
