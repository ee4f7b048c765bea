"""Planning ``cbpo-orch update``: which (user, method) runs of a job a new version of its data
trains again, and which carry the current adapter over by reference.

A user is compared by the fingerprint of its history items (``fingerprint.py``) with the run
the job recorded: a new user, a user whose items changed, and a run that did not succeed (or
was recorded before fingerprints existed) train; every other run is carried over unchanged, and
so is every user of the job that the new data no longer holds or that ``--users`` leaves out.
The update job then runs through the driver like any job (``resume`` finishes it after a crash).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from cbpo_orch.data.dataset import Dataset, load_split
from cbpo_orch.data.tasks import load_task
from cbpo_orch.orchestrator.fingerprint import user_fingerprint
from cbpo_orch.orchestrator.spec import JobSpec, Resources, check_budgets, check_paths, resolve_users
from cbpo_orch.orchestrator.workspace import Workspace
from cbpo_orch.storage.lineage import Basis, PlannedRun, RunInputs

UNFINISHED = ("pending", "running", "interrupted")


class NotUpdatable(ValueError):
    """The job cannot be updated now (it has not finished, or was cancelled)."""


@dataclass(frozen=True)
class UpdatePlan:
    """The update job's runs, its users in order, and who is new, changed or unchanged (by
    the fingerprint of its history; an unchanged user's failed run trains all the same)."""

    runs: list[PlannedRun]
    users: list[str]
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def trains(self) -> int:
        """How many runs the update trains."""
        return sum(run.carry_run_id is None for run in self.runs)

    def summary(self) -> str:
        return (
            f"{len(self.new)} new, {len(self.changed)} changed, {len(self.unchanged)} unchanged users: "
            f"{self.trains} runs to train, {len(self.runs) - self.trains} carried over"
        )


def plan_update(
    basis: Mapping[tuple[str, str], Basis],
    job_users: Sequence[str],
    methods: Sequence[str],
    dataset: Dataset,
    chosen: Sequence[str],
    max_profile: int | None,
) -> UpdatePlan:
    """The plan for the ``chosen`` users of ``dataset`` (the new data), against ``basis``
    (``Registry.update_basis`` of the job whose ``job_users`` ran ``methods``); DataError for
    a chosen user whose history cannot be read."""
    runs: list[PlannedRun] = []
    users, new, changed, unchanged = [], [], [], []
    for user in chosen:
        fingerprint, n_items = user_fingerprint(dataset, user, max_profile)
        inputs = RunInputs(fingerprint, n_items)
        known = [basis.get((user, method)) for method in methods]
        carried = [b.carry_run_id if b is not None and b.data_fingerprint == fingerprint else None for b in known]
        runs += [PlannedRun(user, method, carry, inputs) for method, carry in zip(methods, carried)]
        users.append(user)
        same = all(b is not None and b.data_fingerprint == fingerprint for b in known)
        (new if all(b is None for b in known) else unchanged if same else changed).append(user)
    for user in job_users:
        if user in users:
            continue
        kept = [(method, basis[(user, method)]) for method in methods if basis[(user, method)].carry_run_id is not None]
        runs += [PlannedRun(user, method, b.carry_run_id, _inputs(b)) for method, b in kept]
        if kept:
            users.append(user)
            unchanged.append(user)
    return UpdatePlan(runs, users, new, changed, unchanged)


def _inputs(basis: Basis) -> RunInputs | None:
    return None if basis.data_fingerprint is None else RunInputs(basis.data_fingerprint, basis.n_items or 0)


def _starting_task_adapter(space: Workspace, spec: JobSpec) -> str:
    """The job's task adapter as the update names it: the folder the job's users started from
    (an ``auto`` one is not trained again on the new data: carried and retrained users share
    one starting model, and a server loads one), or ``none``."""
    from cbpo_orch.orchestrator.job_model import job_task_adapter

    return job_task_adapter(space, spec) or "none"


def start_update(space: Workspace, job_id: str, data: str, users: str = "all", promote: str = "check") -> tuple[str | None, UpdatePlan, Resources]:
    """Plan the update of ``job_id`` on ``data`` (``users``: which of its users to compare, as
    ``submit --users`` reads it) and, when it trains anything, create the update job (its
    budgets checked first); returns its id (None when nothing trains), the plan and the job's
    resources, for the driver to run it."""
    registry = space.registry
    parent = registry.job(job_id)
    if parent.state in UNFINISHED or parent.state == "cancelled":
        then = "submit it again instead" if parent.state == "cancelled" else f"finish it first with `cbpo-orch resume {job_id}`"
        raise NotUpdatable(f"job {job_id} is {parent.state}; {then}")
    spec, resources = JobSpec.from_config(parent.config)
    task = load_task(spec.task)
    data_ref, _ = check_paths(data, spec.model)
    dataset = load_split(data_ref, spec.split, task)
    plan = plan_update(registry.update_basis(job_id), parent.users, parent.methods, dataset, resolve_users(users, dataset), spec.train.max_profile)
    if not plan.trains:
        return None, plan, resources
    trained = tuple(dict.fromkeys(run.user_id for run in plan.runs if run.carry_run_id is None))
    check_budgets(task, dataset, trained, spec.model, spec.train)
    updated = replace(spec, data=data_ref, users=tuple(plan.users), task_adapter=_starting_task_adapter(space, spec))
    return registry.create_update(job_id, updated.to_config(resources), plan.runs, promote), plan, resources
