"""The artifact store: immutable directories of files, written atomically under one root.

Checksum of a directory (:func:`directory_sha256`, :func:`files_sha256`): the
SHA-256 of, for each regular file in ascending order of its path relative to
the directory (POSIX separators, compared as Python strings):

    UTF-8 bytes of the relative path, one NUL byte, the file size as an 8-byte
    big-endian unsigned integer, then the file's bytes.

Empty sub-directories do not count.  The size prefix keeps the encoding
unambiguous, so two different directories never share a byte stream.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@+=-]{0,254}")


@dataclass(frozen=True)
class ArtifactInfo:
    """Where an artifact directory lies, its checksum and its total size in bytes."""

    path: Path
    sha256: str
    bytes: int

    def as_dict(self) -> dict[str, Any]:
        """Return the ``path``/``sha256``/``bytes`` mapping the registry records."""
        return {"path": str(self.path), "sha256": self.sha256, "bytes": self.bytes}


def check_name(name: str) -> str:
    """Return ``name`` if it is safe as one path component, else raise ValueError.

    Safe: 1 to 255 characters from ``A-Z a-z 0-9 . _ @ + = -``, not starting
    with ``.`` or ``-`` (so no ``..``, no hidden names, no separators).
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name):
        raise ValueError(f"unsafe name for an artifact path component: {name!r}")
    return name


def files_sha256(files: Mapping[str, bytes]) -> str:
    """Return the checksum that a directory holding ``files`` (relative path -> bytes) has."""
    digest = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        digest.update(_entry_header(name, len(data)))
        digest.update(data)
    return digest.hexdigest()


def directory_sha256(path: str | os.PathLike[str]) -> str:
    """Return the checksum of the directory at ``path`` (definition in the module docstring)."""
    digest = hashlib.sha256()
    for name, file in _walk_files(Path(path)):
        digest.update(_entry_header(name, file.stat().st_size))
        with file.open("rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()


class ArtifactStore:
    """Immutable artifact directories under ``root``.

    Paths handed to :meth:`verify` may be absolute (as in
    :attr:`ArtifactInfo.path`) or relative to ``root``.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def write_dir(self, relative: str, files: Mapping[str, bytes]) -> ArtifactInfo:
        """Write ``files`` as the directory ``root/relative``, atomically.

        ``relative`` and every file name are ``/``-separated components that
        must pass :func:`check_name`.  The files are written and fsynced in a
        hidden staging directory beside the target, which is then renamed into
        place, so the target is either absent or complete.  If the target
        exists with the same content its info is returned without rewriting;
        with other content :class:`FileExistsError` is raised (artifacts are
        never overwritten: write a new path, e.g. one per attempt).
        """
        target = self.root.joinpath(*_components(relative))
        payload = _checked_files(files)
        info = ArtifactInfo(target, files_sha256(payload), sum(map(len, payload.values())))
        if target.exists():
            return _existing(target, info)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
        staging.mkdir()
        try:
            try:
                _fill(staging, payload)
            except OSError as error:  # a full device's write names no file: name the folder
                if error.errno is None or error.filename is not None:
                    raise
                raise OSError(error.errno, error.strerror, str(target)) from error
            try:
                os.rename(staging, target)
            except OSError:
                if not target.exists():
                    raise
                return _existing(target, info)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _fsync_dir(target.parent)
        return info

    def verify(self, path: str | os.PathLike[str], sha256: str) -> bool:
        """Tell whether the directory at ``path`` exists and has checksum ``sha256``."""
        directory = self._resolve(path)
        return directory.is_dir() and directory_sha256(directory) == sha256

    def find(self, relative: str) -> ArtifactInfo | None:
        """The artifact at ``root/relative`` if it exists (complete: writes are atomic), else None."""
        directory = self.root.joinpath(*_components(relative))
        if not directory.is_dir():
            return None
        return ArtifactInfo(directory, directory_sha256(directory), sum(f.stat().st_size for _, f in _walk_files(directory)))

    def remove_unregistered(self, relative: str, depth: int, registered: Iterable[str | os.PathLike[str]]) -> list[Path]:
        """Delete what a crash left below ``root/relative``: every directory ``depth`` levels
        down (where artifacts and their staging directories lie) that is not one of
        ``registered``. Returns what was deleted. Only the one driver of the job may call
        it (it holds the job's lease), so nothing it deletes is being written."""
        keep = {self._resolve(path).resolve() for path in registered}
        base = self.root.joinpath(*_components(relative))
        stale = sorted(d for d in base.glob("/".join(["*"] * depth)) if d.is_dir() and d.resolve() not in keep)
        for directory in stale:
            shutil.rmtree(directory)
        return stale

    def _resolve(self, path: str | os.PathLike[str]) -> Path:
        """Interpret ``path`` as absolute, or relative to the root."""
        candidate = Path(path)
        return candidate if candidate.is_absolute() else self.root / candidate


def _components(relative: str) -> list[str]:
    """Split a ``/``-separated relative path and check each component."""
    if not isinstance(relative, str) or not relative:
        raise ValueError(f"artifact path must be a non-empty string, got {relative!r}")
    return [check_name(part) for part in relative.split("/")]


def _checked_files(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """Check file names and contents; return them with names in normal form."""
    if not files:
        raise ValueError("an artifact directory needs at least one file")
    payload: dict[str, bytes] = {}
    for name, data in files.items():
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"content of {name!r} must be bytes, not {type(data).__name__}")
        payload["/".join(_components(name))] = bytes(data)
    return payload


def _existing(target: Path, expected: ArtifactInfo) -> ArtifactInfo:
    """Return ``expected`` if ``target`` already holds that content, else raise."""
    found = directory_sha256(target) if target.is_dir() else None
    if found != expected.sha256:
        raise FileExistsError(
            f"artifact {target} already exists with other content (sha256 {found}, "
            f"expected {expected.sha256}); artifacts are never overwritten"
        )
    return expected


def _fill(staging: Path, payload: Mapping[str, bytes]) -> None:
    """Write every file under ``staging`` and make files and directories durable."""
    directories = {staging}
    for name, data in payload.items():
        destination = staging.joinpath(*name.split("/"))
        destination.parent.mkdir(parents=True, exist_ok=True)
        directories.add(destination.parent)
        _write_file(destination, data)
    for directory in sorted(directories, key=lambda item: len(item.parts), reverse=True):
        _fsync_dir(directory)


def _write_file(destination: Path, data: bytes) -> None:
    """Create ``destination`` with ``data`` and fsync it."""
    with destination.open("xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(directory: Path) -> None:
    """Flush a directory's entries to disk."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _walk_files(directory: Path) -> Iterator[tuple[str, Path]]:
    """Yield (relative POSIX path, path) of every regular file below ``directory``, sorted."""
    found = [
        (file.relative_to(directory).as_posix(), file)
        for file in directory.rglob("*")
        if file.is_file()
    ]
    yield from sorted(found)


def _entry_header(name: str, size: int) -> bytes:
    """Return the bytes hashed before a file's content: path, NUL, 8-byte size."""
    return name.encode("utf-8") + b"\0" + size.to_bytes(8, "big")
