"""A running server follows the registry: every few seconds the process that runs ``serve``
reads what is current (one read: ``catalog.served_users``) and the ``--api-keys`` file, and
hands the server's ingress what changed, so new users, new current versions (an update, a
promotion, a rollback), forgotten users and new keys are served without a restart.

The ingress answers each request with what it held when the request came: the version rides
with the request to the replica (``app.py``), so a request in flight finishes on it. Each
reading the ingress is handed carries a stamp; every poll asks the ingress for the stamp it
holds, so an ingress that Serve restarted (with the catalog ``serve`` started with) is
brought up to date by the next poll even when nothing changed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cbpo_orch.orchestrator.cluster import first_line
from cbpo_orch.serving.catalog import UserAdapterEntry, changes
from cbpo_orch.serving.keys import ApiKeys, KeyFileError, load_api_keys

Users = dict[str, UserAdapterEntry]


class FollowingIngress(Protocol):
    """The running server's ingress as the follower talks to it."""

    def following(self) -> int:
        """The stamp of the reading it holds (0: the one it started with)."""

    def follow(self, users: Users, keys: ApiKeys | None, stamp: int) -> None:
        """Answer new requests with ``users`` and ``keys`` from now on."""


class Follower:
    """Keeps ``ingress`` on what ``read_users`` reads and on the key file at ``keys_path``
    (None: the server has no keys); ``users`` and ``keys``: what it started with."""

    def __init__(self, read_users: Callable[[], Users], ingress: FollowingIngress, users: Users, keys_path: Path | None, keys: ApiKeys | None):
        self.read_users, self.ingress = read_users, ingress
        self.users, self.keys_path, self.keys = users, keys_path, keys
        self.stamp = 0
        self._problem: str | None = None

    def poll(self) -> list[str]:
        """Read the registry and the key file once, hand the ingress what changed (or all of
        it, when it lost what it was handed); returns lines that say what changed."""
        users = self.read_users()
        keys, lines = self._read_keys()
        if changed := changes(self.users, users):
            lines.append(changed.summary())
        if keys != self.keys:
            lines.append(f"API keys reloaded from {self.keys_path}: {len(keys.grants)} keys")
        if users != self.users or keys != self.keys:
            self.users, self.keys, self.stamp = users, keys, self.stamp + 1
        if self.ingress.following() != self.stamp:
            self.ingress.follow(self.users, self.keys, self.stamp)
        return lines

    def run(self, every_s: float, stop: threading.Event, report: Callable[[str], None]) -> None:
        """Poll every ``every_s`` seconds until ``stop`` is set; ``report`` sees what changed,
        and a failed poll (the server keeps what it was handed last), once for polls that fail
        alike in a row."""
        failure = None
        while not stop.wait(every_s):
            try:
                lines = self.poll()
            except Exception as error:  # the registry or the server away for a while: poll again
                now = f"following the registry failed ({first_line(error)}); still serving what was read last"
                lines, failure = ([] if now == failure else [now]), now
            else:
                failure = None
            for line in lines:
                report(line)

    def _read_keys(self) -> tuple[ApiKeys | None, list[str]]:
        """The key file as it is now; while it cannot be used, the keys held (said once)."""
        if self.keys_path is None:
            return None, []
        try:
            keys = load_api_keys(self.keys_path)
        except KeyFileError as error:
            lines = [] if str(error) == self._problem else [f"{error}; still using the keys read before"]
            self._problem = str(error)
            return self.keys, lines
        self._problem = None
        return keys, []
