"""PAG's profile summaries kept between jobs, in the home's cache: one folder per starting model
(``cache/summary/FINGERPRINT``, named as π_ref's cache names it:
``reference_cache.starting_model_fingerprint``), in it one folder per user (a digest of its id)
and one small JSON file per summary.

A summary is found by :func:`summary_key`: a digest of the instruction the starting model read
(which renders the very items it summarized, so another history is another key) and of its
token budget. The driver reads the summaries of a job's PAG users before the fan-out and hands
them to the workers, which write only the summaries they lack, and it keeps each summary a
worker wrote. Each file is written to a temporary name and renamed, so a reader never sees half
of one; a file that cannot be read counts as absent.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path


def summary_key(instruction: str, new_tokens: int) -> str:
    """The key a summary is found by: the instruction it was written from and its token budget."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{new_tokens}\0".encode() + instruction.encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def _user_folder(user_id: str) -> str:
    """A user's folder: a digest of its id (ids may hold any character)."""
    return hashlib.sha256(user_id.encode("utf-8", "surrogatepass")).hexdigest()[:24]


class SummaryCache:
    """The summaries written by one starting model: ``folder`` is ``cache/summary/FINGERPRINT``.
    An entry is the record the run keeps of its summary (a JSON object), by its key."""

    def __init__(self, folder: Path):
        self.folder = folder

    def load(self, user_ids: set[str]) -> dict[str, dict]:
        """Every summary kept of ``user_ids``, by key."""
        entries = {}
        for user_id in sorted(user_ids):
            for file in sorted((self.folder / _user_folder(user_id)).glob("*.json")):
                try:
                    entries[file.stem] = json.loads(file.read_text())
                except (OSError, ValueError):
                    continue
        return entries

    def keep(self, user_id: str, key: str, entry: dict) -> None:
        """Keep ``entry`` of ``user_id`` under ``key`` (write a temporary file, then rename it)."""
        folder = self.folder / _user_folder(user_id)
        folder.mkdir(parents=True, exist_ok=True)
        staging = folder / f".{uuid.uuid4().hex}.tmp"
        try:
            staging.write_text(json.dumps(entry))
            os.replace(staging, folder / f"{key}.json")
        finally:
            staging.unlink(missing_ok=True)


def forget_user_summaries(root: Path, user_id: str) -> int:
    """Remove ``user_id``'s summaries under ``root`` (``cache/summary``), of every starting
    model; returns how many starting models held some."""
    removed = 0
    for folder in sorted(root.glob(f"*/{_user_folder(user_id)}")) if root.is_dir() else []:
        shutil.rmtree(folder)
        removed += 1
    return removed
