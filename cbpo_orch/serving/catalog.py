"""What a job can serve: its starting model and, per user, the current adapter version of one
method in the job's line.

Read from the registry by the process that runs ``serve`` and handed to the server as plain
values, so no replica opens the registry. The starting model is read once; the users are
read again every few seconds (``follow.py``), and :func:`changes` says what a new reading
changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cbpo_orch.data.tasks import Budgets, Task
from cbpo_orch.method.config import LoraSettings, TrainConfig


class NotServable(ValueError):
    """A job, method or adapter that cannot be served or exported (a user mistake)."""


class UnknownUser(KeyError):
    """No user of that id in the job."""

    def __str__(self) -> str:
        return f"the job has no user {self.args[0]!r}"


class UserNotReady(RuntimeError):
    """The user's run for the method did not succeed (failed, or not finished)."""


@dataclass(frozen=True)
class UserAdapterEntry:
    """One user of the job's line for the served method: its current adapter version, or
    without one the state (and error) of its latest run."""

    user_id: str
    state: str
    adapter_path: str | None = None
    sha256: str | None = None
    error: str | None = None
    version: int | None = None

    @property
    def model_id(self) -> str:
        """The version's multiplexed model id, the key of a replica's LRU of adapters: a
        replaced version is never asked for again. The digest keeps a user forgotten and
        trained anew (its numbers start again at 1) from meeting its old adapter there."""
        return f"{self.user_id}@v{self.version}-{self.sha256[:12]}"


@dataclass(frozen=True)
class Changes:
    """What a new reading of the users changed: users now served that were not, users whose
    served version changed (user, from, to), users no longer served (forgotten, or their
    only version rolled back)."""

    added: tuple[str, ...] = ()
    replaced: tuple[tuple[str, int, int], ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.replaced or self.removed)

    def summary(self) -> str:
        """One line, such as ``now serving u3 (v1); u1 v1 → v2; no longer serving u2``."""
        parts = []
        if self.added:
            parts.append("now serving " + ", ".join(self.added))
        parts += [f"{user} v{before} → v{after}" for user, before, after in self.replaced]
        if self.removed:
            parts.append("no longer serving " + ", ".join(self.removed))
        return "; ".join(parts)


def changes(before: dict[str, UserAdapterEntry], after: dict[str, UserAdapterEntry]) -> Changes:
    """What serving ``after`` instead of ``before`` changes, by user id; users served in
    neither (a run that failed or is pending) are no change."""
    old = {user: entry for user, entry in before.items() if entry.adapter_path}
    new = {user: entry for user, entry in after.items() if entry.adapter_path}
    return Changes(
        added=tuple(sorted(set(new) - set(old))),
        replaced=tuple((user, old[user].version, new[user].version) for user in sorted(set(old) & set(new)) if old[user].model_id != new[user].model_id),
        removed=tuple(sorted(set(old) - set(new))),
    )


@dataclass(frozen=True)
class ServedRetrieval:
    """What a ``--retrieve`` job's prompts carry, for the server to compose a request's prompt
    as evaluation composed the user's queries: the split the users' items come from, the
    folder of the job's history index and its embedder, and the method's config (k,
    retriever, profile cap)."""

    data: str
    split: str
    history: str
    embedder: str | None
    config: TrainConfig


@dataclass(frozen=True)
class Catalog:
    """A job's starting model and its users' adapters for one method; ``retrieval``: how its
    prompts carry retrieved items (None: they carry none)."""

    job_id: str
    method: str
    model_path: str
    task_adapter: str | None
    lora: LoraSettings
    budgets: Budgets
    task: Task
    users: dict[str, UserAdapterEntry] = field(default_factory=dict)
    retrieval: ServedRetrieval | None = None

    @property
    def base_name(self) -> str:
        """The name the starting model answers to (``model`` of a request): its folder's name."""
        return Path(self.model_path).name

    @property
    def servable(self) -> list[str]:
        """Users with a current adapter version, by user id."""
        return [user for user, entry in self.users.items() if entry.adapter_path]

    def adapter(self, user_id: str) -> UserAdapterEntry:
        """The user's entry; :class:`UnknownUser` or :class:`UserNotReady` when it has no adapter."""
        entry = self.users.get(user_id)
        if entry is None:
            raise UnknownUser(user_id)
        if entry.adapter_path is None:
            reason = f": {entry.error}" if entry.error else ""
            raise UserNotReady(f"user {user_id!r} has no {self.method} adapter: its run is {entry.state}{reason}")
        return entry


def served_users(registry, job_id: str, method: str) -> dict[str, UserAdapterEntry]:
    """Every user of ``job_id``'s line for ``method`` as it is served now, by user id: one
    read of the registry."""
    return {
        row["user_id"]: UserAdapterEntry(row["user_id"], row["state"], row["adapter_path"], row["sha256"], row["error"], row["version"])
        for row in registry.served(job_id, method)
    }


def load_catalog(space, job_id: str, method: str) -> Catalog:
    """The catalog of ``job_id`` for ``method``: the job's starting model, and its line's
    users as they are now (UnknownJob for an unknown job, NotServable for a method the job
    did not run or that trains no adapter)."""
    from cbpo_orch.data.tasks import load_task
    from cbpo_orch.method.methods import method_spec
    from cbpo_orch.orchestrator.job_model import job_task_adapter
    from cbpo_orch.orchestrator.spec import JobSpec
    from cbpo_orch.workers.context import history_datasets, history_key
    from cbpo_orch.workers.prompts import prompt_kind

    info = space.registry.job(job_id)
    if method not in info.methods:
        raise NotServable(f"job {job_id} did not run method {method!r} (its methods: {', '.join(info.methods)})")
    if not method_spec(method).trains:
        raise NotServable(f"method {method!r} trains no adapter: serve the base model with a method that does")
    spec, _ = JobSpec.from_config(info.config)
    train, task = spec.config_for(method), load_task(spec.task)
    retrieval = None
    if prompt_kind(train) == "retrieved":
        folder = space.cache / "history" / history_key(history_datasets(spec.data, spec.split, task), spec.embedder)
        retrieval = ServedRetrieval(spec.data, spec.split, str(folder), spec.embedder, train)
    return Catalog(
        job_id=job_id,
        method=method,
        model_path=spec.model,
        task_adapter=job_task_adapter(space, spec),
        lora=train.lora,
        budgets=task.budgets(train.max_prompt_tokens, train.max_new_tokens),
        task=task,
        users=served_users(space.registry, job_id, method),
        retrieval=retrieval,
    )
