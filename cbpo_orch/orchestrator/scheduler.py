"""The Ray layer: it only schedules.

One :class:`PersonalizeWorker` actor per worker slot loads the model, data and history
once and then personalizes user after user; the driver keeps at most one call in
flight per actor (never thousands of pending futures), replaces an actor that dies,
and receives every result to write it itself.

A failure is permanent when a retry would fail the same way (:data:`PERMANENT_ERRORS`:
the job's own input is at fault, or a seeded training diverged). Anything else — a dead
worker, out of memory, any other exception — is transient and may be retried. When the
cluster itself goes away, ``cluster.ClusterLost`` ends the fan-out. Joining and sizing the
cluster is ``cluster.py``'s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import ray
from ray.exceptions import OutOfMemoryError, RayActorError, RayTaskError, WorkerCrashedError

from cbpo_orch.data.dataset import DataError
from cbpo_orch.method.config import ConfigError, TrainConfig
from cbpo_orch.method.methods import UnknownMethod
from cbpo_orch.orchestrator.cluster import Fit, cluster_deaths_as_lost, cluster_fit, first_line, largest_node, largest_node_cpus, task_cause
from cbpo_orch.orchestrator.packing import Failure, PackQueue, Work
from cbpo_orch.training.model_dirs import ModelError
from cbpo_orch.training.numerics import NumericalError
from cbpo_orch.training.worker_memory import parameter_count, worker_memory_bytes

PERMANENT_ERRORS: tuple[type[Exception], ...] = (DataError, ConfigError, ModelError, UnknownMethod, NumericalError)
"""Errors that a retry would repeat: the job's own input (data, config, model, method), or
a seeded training that diverged. Never retried."""

WORKER_DEATHS = (RayActorError, WorkerCrashedError, OutOfMemoryError)
"""How Ray reports a worker process that died: the actor is replaced."""

TASK_FAILURES = (RayTaskError, *WORKER_DEATHS)
"""How a task that raised, or whose worker died, reaches the caller of :func:`map_shards`."""

def worker_memory(model: str, on_gpu: bool) -> int:
    """The bytes of Ray's ``memory`` each worker training ``model`` asks for (its peak:
    ``worker_memory.py``), so that Ray never places more workers on a node than its memory
    holds; at most the largest alive node's, so that a worker larger than every node still
    runs, alone, as it would without asking."""
    return min(worker_memory_bytes(parameter_count(model), on_gpu), largest_node("memory", 0))


class WorkerCannotStart(Exception):
    """Raised by every call to a worker whose context failed to load with a permanent
    error: no worker of the pool can start, so the job sends it nothing more."""


@dataclass(frozen=True)
class WorkerSetup:
    """What every worker of a job starts from: the task, the data and its split, the starting
    model and task adapter, the job's passes (the history index, π_ref's log-probs, γ), the
    worker function, what each worker asks Ray for, the PAG summaries found in the home's
    cache, and the adapter folders of the current versions that the runs of a checking update
    are compared with, by (user, method). The passes travel to the workers once, through the
    object store."""

    task: str
    data: str
    split: str
    model: str
    task_adapter: str | None
    history: object
    reference: dict
    gammas: dict
    worker_fn: Callable
    cpus_per_user: float = 1.0
    gpus_per_user: float = 0.0
    summaries: dict = field(default_factory=dict)
    incumbents: dict = field(default_factory=dict)


def worker_fit(setup: WorkerSetup) -> Fit:
    """How many of the job's workers the cluster holds now, each asking for its CPUs, GPUs
    and peak memory (:func:`worker_memory`), and which of them limits the count."""
    return cluster_fit(setup.cpus_per_user, setup.gpus_per_user, worker_memory(setup.model, setup.gpus_per_user > 0))


@ray.remote
class PersonalizeWorker:
    """Holds one loaded :class:`UserContext` and personalizes users with it.

    A permanent error while loading is kept and raised by each call as
    :class:`WorkerCannotStart`: raised from ``__init__`` it would reach the driver as
    a bare actor death, its class lost, and the actor would be recreated in vain.
    """

    def __init__(self, setup: WorkerSetup, history, reference: dict, gammas: dict):
        """``setup`` without its passes, which come as ``history``, ``reference`` and ``gammas``
        (Ray resolves them from the object store)."""
        import torch

        from cbpo_orch.data.dataset import load_split
        from cbpo_orch.data.tasks import load_task
        from cbpo_orch.workers.user_context import load_user_context

        torch.set_num_threads(max(1, int(setup.cpus_per_user)))
        self.worker_fn = setup.worker_fn
        self.start_error: str | None = None
        try:
            task = load_task(setup.task)
            dataset = load_split(setup.data, setup.split, task)
            self.context = load_user_context(task, dataset, history, setup.model, setup.task_adapter, "auto", reference, gammas, setup.summaries, setup.incumbents)
        except PERMANENT_ERRORS as error:
            self.start_error = first_line(error)

    def personalize(self, user_ids: list[str], config: TrainConfig):
        """The outcomes of ``user_ids``, trained together (``worker_fn(context, user_ids, config)``)."""
        if self.start_error is not None:
            raise WorkerCannotStart(self.start_error)
        return self.worker_fn(self.context, user_ids, config)


@ray.remote(num_cpus=0)
class _LatestStep:
    """Holds the last (step, total, loss) a task reported."""

    def __init__(self):
        self.latest = None

    def put(self, step: int, total: int, loss: float) -> None:
        self.latest = (step, total, loss)

    def get(self):
        return self.latest


@dataclass
class _StepReporter:
    """A task's ``on_step``: sends every step to a :class:`_LatestStep` without waiting."""

    sink: object

    def __call__(self, step: int, total: int, loss: float) -> None:
        self.sink.put.remote(step, total, loss)


@ray.remote
def _call(fn: Callable, *args, **kwargs):
    """``fn(*args, **kwargs)`` as a Ray task: ``fn`` a function or a named entry point
    (``workers/entrypoints.py``), which only the worker imports."""
    return fn(*args, **kwargs)


@cluster_deaths_as_lost()
def run_remote(fn: Callable, *args, num_cpus: float = 1, num_gpus: float = 0, on_step: Callable[[int, int, float], None] | None = None):
    """Run a plain function once as a Ray task and return its result. With ``on_step``, the
    function is given an ``on_step`` of its own, and what it reports reaches ``on_step``
    here about once a second while the task runs."""
    task = _call.options(num_cpus=num_cpus, num_gpus=num_gpus)
    if on_step is None:
        return ray.get(task.remote(fn, *args))
    sink = _LatestStep.remote()
    ref = task.remote(fn, *args, on_step=_StepReporter(sink))
    try:
        while not ray.wait([ref], timeout=1.0)[0]:
            if (latest := ray.get(sink.get.remote())) is not None:
                on_step(*latest)
        return ray.get(ref)
    finally:
        ray.kill(sink)


def shard_plan(items: int, min_shard: int, gpus: bool = False, rounds: int = 1) -> tuple[int, int]:
    """How to split ``items`` over the cluster: (shards, CPUs for each). ``rounds`` shards per
    CPU of the cluster (with ``gpus``: per GPU, one GPU each), none smaller than ``min_shard``
    items (each pays a model load), and every CPU in use: fewer shards get more CPUs each, up
    to a whole node. More rounds than one cost a model load each and show progress sooner."""
    have = ray.cluster_resources()
    total = max(1, int(have.get("CPU", 1)))
    devices = int(have.get("GPU", 0)) if gpus else total
    shards = max(1, min(devices * rounds, -(-items // max(1, min_shard))))
    return shards, max(1, min(largest_node_cpus(), total // shards))


def shard_bounds(costs: list[float], shards: int) -> list[int]:
    """Where ``shards`` contiguous shards of items of these ``costs`` start and end
    (``shards + 1`` indices from 0 to ``len(costs)``): each shard ends where the running cost
    comes nearest its even share of the total, and none is empty (while items last)."""
    n, total = len(costs), float(sum(costs))
    shards = max(1, min(shards, n))
    bounds, running, k = [0], 0.0, 0
    for j in range(1, shards):
        target = total * j / shards
        while k < n - (shards - j) and (k < bounds[-1] + 1 or abs(running + costs[k] - target) <= abs(running - target)):
            running += costs[k]
            k += 1
        bounds.append(k)
    return bounds + [n]


@cluster_deaths_as_lost()
def map_shards(
    fn: Callable,
    items: list,
    *args,
    min_shard: int,
    gpus: bool = False,
    rounds: int = 1,
    cost: Callable[[object], float] = lambda item: 1.0,
    on_done: Callable[[int, int], None] = lambda done, total: None,
) -> list:
    """``fn(shard, *args, threads=N)`` over contiguous shards of ``items``, as Ray tasks in
    parallel (:func:`shard_plan`; with ``gpus``, one GPU each), the shards even in summed
    ``cost`` (:func:`shard_bounds`: a shard of long items ends sooner); returns the shards'
    results in the items' order and calls ``on_done(finished, shards)`` as each finishes."""
    shards, cpus = shard_plan(len(items), min_shard, gpus, rounds)
    task = _call.options(num_cpus=cpus, num_gpus=1 if gpus else 0)
    args = [ray.put(arg) for arg in args]  # sent to the object store once, not once per shard
    bounds = shard_bounds([cost(item) for item in items], shards)
    refs = [task.remote(fn, items[lo:hi], *args, threads=cpus) for lo, hi in zip(bounds, bounds[1:])]
    waiting = list(refs)
    while waiting:
        _, waiting = ray.wait(waiting, num_returns=1)
        on_done(shards - len(waiting), shards)
    return ray.get(refs)


@cluster_deaths_as_lost()
def fan_out(
    work: Iterable[Work],
    setup: WorkerSetup,
    slots: int,
    start: Callable[[Work], bool],
    finish: Callable[[Work, object], list[Work]],
    tick: Callable[[], None] = lambda: None,
    users_per_step: int = 1,
) -> None:
    """Run every unit of ``work`` on a pool of at most ``slots`` actors, each call a pack of
    up to ``users_per_step`` units of the same config (trained in the same passes; fewer
    when less waits than fills every actor, :func:`pack_size`). Each actor asks Ray for
    its peak memory (:func:`worker_memory`), and no more actors start than the cluster
    holds (:func:`worker_fit`): one Ray could not place would never take its work. Every actor starts from
    ``setup``, its passes (history index, π_ref's log-probs, γ) put in the object store once.

    ``start(w)`` is asked before a unit is sent (False skips it, e.g. cancelled);
    ``finish(w, result_or_failure)`` receives each result or :class:`Failure` and
    returns units to schedule again (retries). ``tick`` runs about once a second.
    When the workers cannot start, every unit not yet sent is finished, unstarted,
    with that permanent failure. When a pack of several units fails, each unit is
    finished with a ``shared`` failure and its retry goes alone. When the cluster itself
    goes away, :class:`ClusterLost` is raised.
    """
    packs = PackQueue(work, users_per_step, start)
    if not packs:
        return
    passes = [ray.put(setup.history), ray.put(setup.reference), ray.put(setup.gammas)]
    bare = replace(setup, history=None, reference={}, gammas={})
    fit = worker_fit(setup)
    options = dict(num_cpus=fit.cpus, num_gpus=fit.gpus, memory=fit.memory)

    def new_actor():
        return PersonalizeWorker.options(**options).remote(bare, *passes)

    idle = [new_actor() for _ in range(min(max(1, slots), fit.workers, len(packs)))]
    n_actors = len(idle)
    in_flight: dict = {}

    def dispatch() -> None:
        while packs and idle:
            pack = packs.next_pack(n_actors)
            if pack:
                actor = idle.pop()
                in_flight[actor.personalize.remote([unit.user_id for unit in pack], pack[0].config)] = (pack, actor)

    while packs or in_flight:
        dispatch()
        if not in_flight:
            continue
        done, _ = ray.wait(list(in_flight), num_returns=1, timeout=1.0)
        landed = []
        for ref in done:
            pack, actor = in_flight.pop(ref)
            cannot_start = False
            try:
                results = ray.get(ref)
            except WORKER_DEATHS as error:
                results = [Failure(f"worker died: {first_line(error)}", permanent=False)] * len(pack)
                ray.kill(actor, no_restart=True)
                actor = new_actor()
            except RayTaskError as error:
                cause = task_cause(error)
                cannot_start = isinstance(cause, WorkerCannotStart)
                results = [Failure(first_line(cause), permanent=cannot_start or isinstance(cause, PERMANENT_ERRORS))] * len(pack)
                if cannot_start:  # no worker of this pool can start: send it nothing more
                    for unit in packs.drain():
                        finish(unit, results[0])
            idle.append(actor)
            landed.append((pack, results if cannot_start else packs.landed(pack, results)))
        dispatch()  # the freed workers start their next packs while the driver records these
        for pack, results in landed:
            for unit, result in zip(pack, results):
                packs.extend(finish(unit, result))
        tick()
    for actor in idle:
        ray.kill(actor, no_restart=True)
