"""``cbpo-orch forget USER``: every trace of a user in a home and its registry.

In this order, so that a crash part-way leaves what a second run finishes: the user's adapter
folders (every version and attempt, with their predictions), then its registry rows (runs,
metrics with their predictions, adapters, versions, aux records, its id in its jobs' user
lists), then the deleted rows' bytes in the database's files (SQLite), then the home's caches: its rows of every cached history index (the aux pool of future
training, and the embeddings γ and retrieval read), rewritten without them, every π_ref
cache file holding any of its pairs, and its PAG summaries. Last, an audit line that names the user only by a digest.
"""

from __future__ import annotations

import getpass
import hashlib
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbpo_orch.data.dataset import DataError
from cbpo_orch.data.history import HistoryIndex
from cbpo_orch.data.tasks import load_task
from cbpo_orch.orchestrator.workspace import Workspace
from cbpo_orch.storage.reference_cache import forget_pairs, pair_text_key
from cbpo_orch.storage.summary_cache import forget_user_summaries


class UserInUse(RuntimeError):
    """A live driver runs a job of the user: what it writes next would escape the forgetting."""


@dataclass(frozen=True)
class ForgetReport:
    """What ``forget`` removed, and the runs of other users that trained on the user's items
    as aux items (user, method, job; recorded for runs since registry schema 5)."""

    jobs: list[str]
    runs: int
    versions: int
    adapter_folders: int
    history_rows: int
    reference_caches: int
    summary_caches: int
    aux_users_of: list[tuple[str, str, str]]
    erased: bool = True
    """False when a SQLite registry's write-ahead log could not be emptied (another connection
    kept reading): a second ``forget`` empties it."""

    def counts(self) -> dict[str, int]:
        return {
            "jobs": len(self.jobs), "runs": self.runs, "versions": self.versions, "adapter_folders": self.adapter_folders,
            "history_rows": self.history_rows, "reference_caches": self.reference_caches,
            "summary_caches": self.summary_caches,
        }


def subject_digest(user_id: str) -> str:
    """How the audit log names a user: a digest, never the id."""
    return "sha256:" + hashlib.sha256(user_id.encode()).hexdigest()


def forget_user(space: Workspace, user_id: str, job_id: str | None = None) -> ForgetReport:
    """Remove ``user_id`` from ``space`` (its registry rows and adapters only in ``job_id``'s
    line, if given; the home's caches always) and write the audit line; :class:`UserInUse`
    while a live driver runs one of the user's jobs."""
    registry = space.registry
    line = None if job_id is None else registry.job(job_id).line_id
    jobs = [job for job in registry.jobs() if user_id in job.users and (line is None or job.line_id == line)]
    for job in jobs:
        if job.state == "running" and registry.lease(job.job_id)["seconds_left"] > 0:
            raise UserInUse(f"job {job.job_id} of user {user_id} is running; wait for it to end or `cbpo-orch cancel {job.job_id}` first")
    folders = [f for job in jobs if (f := space.artifacts.root / "adapters" / job.job_id / user_id).is_dir()]
    for folder in folders:
        shutil.rmtree(folder)
    forgotten = registry.forget(user_id, job_id)
    erased = registry.erase_freed()
    pairs, history_rows = _forget_history(space.cache / "history", user_id)
    keys = {pair_text_key(x, y, b.prompt_tokens, b.new_tokens) for x, y in pairs for b in _budgets(registry.jobs())}
    report = ForgetReport(
        jobs=sorted({job.job_id for job in jobs} | set(forgotten.jobs)),
        runs=forgotten.runs,
        versions=forgotten.versions,
        adapter_folders=len(folders),
        history_rows=history_rows,
        reference_caches=forget_pairs(space.cache / "reference", keys),
        summary_caches=forget_user_summaries(space.cache / "summary", user_id),
        aux_users_of=forgotten.aux_users_of,
        erased=erased,
    )
    detail = {**report.counts(), "scope": f"line of job {job_id}" if job_id else "every job", "job_ids": report.jobs}
    registry.audit(f"{getpass.getuser()}@{socket.gethostname()}", "forget", subject_digest(user_id), detail)
    return report


def _budgets(jobs) -> set:
    """Every job's token budgets: what π_ref's cache keys a pair with."""
    found = set()
    for job in jobs:
        train = job.config.get("train", {})
        try:
            task = load_task(job.config.get("task", job.task))
        except DataError:  # a task file since removed: no pair of its jobs can be keyed
            continue
        found.add(task.budgets(train.get("max_prompt_tokens"), train.get("max_new_tokens")))
    return found


def _forget_history(root: Path, user_id: str) -> tuple[set[tuple[str, str]], int]:
    """Rewrite every cached history index under ``root`` that holds rows of ``user_id``
    without them (a folder left with no row is removed); returns the user's (x, y) pairs
    found and how many rows were removed."""
    pairs: set[tuple[str, str]] = set()
    removed = 0
    for left in [*root.glob(".*.forgotten"), *root.glob(".*.rewriting")]:  # what a crash left mid-swap
        shutil.rmtree(left)
    for folder in sorted(root.glob("*")) if root.is_dir() else []:
        if folder.name.startswith(".") or not (folder / "examples.jsonl").is_file():
            continue
        history = HistoryIndex.load(folder)
        keep = [row for row, example in enumerate(history.examples) if example.user_id != user_id]
        if len(keep) == len(history.examples):
            continue
        pairs.update((e.x, e.y) for e in history.examples if e.user_id == user_id)
        removed += len(history.examples) - len(keep)
        _replace(folder, HistoryIndex.from_examples([history.examples[row] for row in keep], history.embeddings[np.asarray(keep, dtype=np.int64)]) if keep else None)
    return pairs, removed


def _replace(folder: Path, history: HistoryIndex | None) -> None:
    """Put ``history`` in ``folder``'s place (None: remove it): written beside it, then swapped."""
    retired = folder.with_name(f".{folder.name}.forgotten")
    shutil.rmtree(retired, ignore_errors=True)
    if history is not None:
        staging = folder.with_name(f".{folder.name}.rewriting")
        shutil.rmtree(staging, ignore_errors=True)
        history.save(staging)
        folder.rename(retired)
        staging.rename(folder)
    else:
        folder.rename(retired)
    shutil.rmtree(retired)
