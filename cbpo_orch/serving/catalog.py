"""What a job can serve: its starting model and, per user, the adapter of one method.

Read once from the registry (a snapshot: users whose runs finish later are served after a
restart) and handed to the server's replicas as plain values, so no replica opens the
registry.
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
    """One user's run for the served method, and its adapter when it succeeded."""

    user_id: str
    state: str
    adapter_path: str | None = None
    sha256: str | None = None
    error: str | None = None


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
        """Users whose run for the method succeeded with an adapter, in the job's order."""
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


def load_catalog(space, job_id: str, method: str) -> Catalog:
    """The catalog of ``job_id`` for ``method`` (UnknownJob for an unknown job, NotServable
    for a method the job did not run or that trains no adapter)."""
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
    adapters = {row["user_id"]: row for row in space.registry.results(job_id) if row["method"] == method}
    runs = {run.user_id: run for run in space.registry.runs(job_id) if run.method == method}
    users = {}
    for user in info.users:
        row, run = adapters.get(user), runs[user]
        users[user] = UserAdapterEntry(user, run.state, row and row["adapter_path"], row and row["sha256"], run.error)
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
        users=users,
        retrieval=retrieval,
    )
