"""API keys of the server: which key may use which users' adapters.

A key file (``--api-keys``, JSON or TOML) maps each key to a list of user ids, or to
``"*"`` for an operator key that may use every user. A request presents its key as
``Authorization: Bearer KEY``: without a known key it is refused (401), for a user the
key may not use it is refused (403). The base model is open to every known key.

Keys are secrets: only their SHA-256 digests are kept (and handed to the server's
replicas), and no message names a key; an entry of the file is named by its position.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path

OPERATOR = "*"
MIN_KEY_LENGTH = 16


class KeyFileError(ValueError):
    """An ``--api-keys`` file that cannot be used."""


@dataclass(frozen=True)
class Access:
    """The answer to a request: ``status`` 200 (allowed), 401 or 403, and why."""

    status: int
    message: str = ""

    @property
    def allowed(self) -> bool:
        return self.status == 200


@dataclass(frozen=True)
class ApiKeys:
    """Key digests → the user ids each may use (None: every user)."""

    grants: dict[str, frozenset[str] | None]

    def access(self, authorization: str | None, user_id: str | None) -> Access:
        """Whether the ``Authorization`` header's key may use ``user_id`` (None: the base model)."""
        grant = self._grant(authorization)
        if grant is False:
            return Access(401, "a valid API key is required: send `Authorization: Bearer KEY`")
        if user_id is None or grant is None or user_id in grant:
            return Access(200)
        return Access(403, f"this API key may not use the adapter of user {user_id!r}")

    def visible(self, authorization: str | None, users: list[str]) -> list[str] | None:
        """Those of ``users`` the key may use, in order; None for an unknown key."""
        grant = self._grant(authorization)
        if grant is False:
            return None
        return list(users) if grant is None else [user for user in users if user in grant]

    def _grant(self, authorization: str | None) -> frozenset[str] | None | bool:
        """The key's grant, or False when there is no known key in the header."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return False
        return self.grants.get(_digest(key.strip()), False)


def load_api_keys(path: str | Path) -> ApiKeys:
    """Read a JSON (``.json``) or TOML (any other name) key file; KeyFileError says what is wrong."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise KeyFileError(f"cannot read the --api-keys file {path}: {type(error).__name__}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except json.JSONDecodeError as error:
        raise KeyFileError(f"--api-keys file {path} is not valid JSON (line {error.lineno}, column {error.colno})") from None
    except tomllib.TOMLDecodeError as error:
        raise KeyFileError(f"--api-keys file {path} is not valid TOML ({_position(error)})") from None
    if not isinstance(data, dict) or not data:
        raise KeyFileError(f"--api-keys file {path} must map each API key to a list of user ids or \"*\"; it holds no keys")
    grants: dict[str, frozenset[str] | None] = {}
    for number, (key, users) in enumerate(data.items(), start=1):
        where = f"--api-keys file {path}, key #{number}"
        if len(key) < MIN_KEY_LENGTH or key != key.strip():
            raise KeyFileError(f"{where}: a key must be at least {MIN_KEY_LENGTH} characters, without surrounding spaces")
        if users == OPERATOR:
            grants[_digest(key)] = None
        elif isinstance(users, list) and users and all(isinstance(u, str) and u for u in users):
            grants[_digest(key)] = frozenset(users)
        else:
            raise KeyFileError(f"{where}: its value must be a non-empty list of user ids, or \"*\" for every user")
    return ApiKeys(grants)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _position(error: tomllib.TOMLDecodeError) -> str:
    """Where the TOML error is (its message's "(at …)" suffix), without the message itself,
    which may quote the file."""
    message = str(error)
    start = message.rfind("(at ")
    return message[start + 1 : -1] if start >= 0 and message.endswith(")") else "at an unknown position"
