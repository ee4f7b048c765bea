"""Running a job: the stages, the fan-out, and the only writer of its results.

Stages: (1) the history index (embeddings, in shards over the cluster, + FAISS), cached
per task/data/embedder; (2) the task adapter, trained once per task/data/model and reused,
when asked for; (3) π_ref's log-probs of every pair the preference runs train on, in one pass
of shards over the cluster (the training prompts of ``--retrieve`` runs composed first, in a pass
of their own), then the γ of every C-BPO run, likewise, and the PAG summaries that earlier jobs
wrote on the same starting model (from the home's cache); (4) one Ray call per
(user, method): select aux → γ → train → generate → score (in an update that checks promotion,
the user's current adapter is scored on the same items too); (5) the job's final state. Workers
return results; this driver writes each adapter atomically to the artifact store and then records
it, once, in the registry.
"""

from __future__ import annotations

import errno
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cbpo_orch.data.dataset import DataError, Dataset
from cbpo_orch.data.embedding import embedding_cost
from cbpo_orch.data.history import HistoryIndex
from cbpo_orch.data.tasks import Task, load_task
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.method.methods import method_spec, mismatched_pairs
from cbpo_orch.orchestrator import cluster, packing, scheduler
from cbpo_orch.orchestrator.fingerprint import run_inputs
from cbpo_orch.orchestrator.lease import LEASE_TTL_S, JobLease, LeaseLost
from cbpo_orch.orchestrator.job_model import task_adapter_key
from cbpo_orch.orchestrator.spec import JobSpec, Resources
from cbpo_orch.orchestrator.workspace import Workspace
from cbpo_orch.storage.lineage import Incumbent, ParentScore
from cbpo_orch.storage.reference_cache import Entry, ReferenceCache, is_left_out, pair_text_key, starting_model_fingerprint
from cbpo_orch.storage.summary_cache import SummaryCache
from cbpo_orch.storage.registry import InvalidTransition, Registry, resume_advice
from cbpo_orch.workers.context import cached_history, history_datasets
from cbpo_orch.workers.entrypoints import BUILD_TASK_ADAPTER, EMBED_SHARD, GAMMA_SHARD, PERSONALIZE_USERS, PROMPT_SHARD, REFERENCE_SHARD
from cbpo_orch.workers.user_items import UserItems, gamma_inputs, prompt_kind, trained_pairs, user_items, with_task_level_gamma

if TYPE_CHECKING:
    from cbpo_orch.workers.personalize import UserOutcome


ADAPTER_DEPTH = 3
"""Adapters lie ``ADAPTER_DEPTH`` levels below ``adapters/JOB``: ``USER/METHOD/attempt-N``."""

REPORT_EVERY_S = 1.0
"""The fan-out reads its counts from the registry (a query over all the job's runs) and reports
them at most this often, not once per run."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class NoSpaceLeft(Exception):
    """The device under the home (artifacts, cache) is full: the job stops, resumable."""


@dataclass
class Progress:
    """What the driver reports while it runs (the CLI draws it)."""

    stage: Callable[[str], None] = lambda text: None
    runs: Callable[[dict, float | None], None] = lambda counts, users_per_hour: None
    notice: Callable[[str], None] = lambda text: None


@dataclass
class _Tally:
    started: float = field(default_factory=time.perf_counter)
    finished: int = 0
    reported: float = float("-inf")


def run_job(
    space: Workspace,
    job_id: str,
    resources: Resources | None = None,
    progress: Progress | None = None,
    worker_fn: Callable = PERSONALIZE_USERS,
    lease_ttl_s: float = LEASE_TTL_S,
) -> str:
    """Run (or resume) every unfinished (user, method) of ``job_id``; returns its final state.

    The job's lease is held throughout (``LeaseHeld`` when another live driver runs it)."""
    progress = progress or Progress()
    registry = space.registry
    job = registry.job(job_id)
    if job.state == "cancelled":
        return job.state  # its runs were cancelled: start none, and keep the job cancelled
    spec, stored_resources = JobSpec.from_config(job.config)
    with JobLease(registry, job_id, lease_ttl_s) as lease:
        return _drive(space, job_id, spec, resources or stored_resources, progress, worker_fn, lease)


def _drive(space: Workspace, job_id: str, spec: JobSpec, resources: Resources, progress: Progress, worker_fn: Callable, lease: JobLease) -> str:
    registry = space.registry
    registry.reset_interrupted(job_id)
    registered = [row["adapter_path"] for row in registry.results(job_id) if row["adapter_path"]]
    removed = space.artifacts.remove_unregistered(f"adapters/{job_id}", ADAPTER_DEPTH, registered)
    if removed:
        progress.notice(f"removed {len(removed)} adapter folders that an earlier driver wrote but never recorded")
    registry.set_job_state(job_id, "running")
    try:
        task = load_task(spec.task)
        progress.stage("connecting to Ray")
        dashboard = cluster.connect(resources.address)
        if dashboard:
            notice = cluster.dashboard_notice(dashboard)
            progress.notice(notice)
            registry.set_lease_notice(job_id, lease.owner, notice)
        datasets = history_datasets(spec.data, spec.split, task)
        history = _history(space, spec, datasets, progress)
        tam_path = _task_adapter(space, spec, resources, progress)
        pending = registry.runs(job_id, states=("pending",))
        planned = _planned_items(spec, datasets[0], history, pending)
        registry.record_inputs(run_inputs(datasets[0], pending, spec.config_for, planned))
        prompted = _prompt_pass(spec, datasets[0], history, planned, progress)
        reference = _reference_pass(space, spec, task, prompted, tam_path, resources, progress)
        gammas = with_task_level_gamma(_gamma_pass(history, planned, progress))
        summary_cache = SummaryCache(space.cache / "summary" / _starting_model(spec, tam_path, resources))
        summaries = summary_cache.load({run.user_id for run in pending if prompt_kind(spec.config_for(run.method)) == "summary"})
        trained = {(run.user_id, run.method) for run in pending}
        incumbents = {key: found for key, found in registry.incumbents(job_id).items() if key in trained}
        progress.stage("personalizing users")
        setup = scheduler.WorkerSetup(
            spec.task, spec.data, spec.split, spec.model, tam_path, history, reference, gammas, worker_fn, resources.cpus_per_user, resources.gpus_per_user,
            summaries, {key: found.adapter_path for key, found in incumbents.items()},
        )
        _fan_out(space, job_id, resources, pending, setup, spec, progress, lease, summary_cache, incumbents)
    except LeaseLost:
        raise  # the job is the other driver's now: leave its state alone
    except cluster.ClusterLost as lost:
        registry.set_job_state(job_id, "interrupted", f"{lost}; {resume_advice(job_id)}")
        raise
    except KeyboardInterrupt:
        registry.set_job_state(job_id, "interrupted", f"interrupted by the user; {resume_advice(job_id)}")
        raise
    except Exception as error:
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            full = NoSpaceLeft(f"no space left on the device writing {error.filename or 'to the home'}")
            _interrupted_if_possible(registry, job_id, f"{full}; {resume_advice(job_id, 'free space')}")
            raise full from error
        registry.set_job_state(job_id, "failed", f"{type(error).__name__}: {error}")
        raise
    lease.check()
    return _finish(registry, job_id)


def _interrupted_if_possible(registry: Registry, job_id: str, reason: str) -> None:
    """Mark the job interrupted, unless the full device holds the registry too: the job then
    stays ``running``, and ``resume`` takes it over from this dead driver all the same."""
    try:
        registry.set_job_state(job_id, "interrupted", reason)
    except Exception:  # noqa: BLE001 (nothing more can be written; the error already says what to do)
        pass


def _finish(registry: Registry, job_id: str) -> str:
    job = registry.job(job_id)
    if job.state == "cancelled":
        return job.state
    failed = job.counts["failed"]
    state, error = ("failed", f"{failed} of {len(job.users) * len(job.methods)} runs failed") if failed else ("succeeded", None)
    registry.set_job_state(job_id, state, error)
    return state


EMBED_MIN_SHARD = 256
"""The fewest texts one embedding task gets (a worker process loads the embedder once, for its
first shard)."""

EMBED_ROUNDS = 4
"""Embedding shards per CPU: a long stage shows its progress a shard at a time, and a worker
whose shards ran fast takes the next, so the stage ends even when the cores are not."""


def _each_tenth(report: Callable[..., None]) -> Callable[..., None]:
    """``report(step, total, ...)`` passed on only when ``step`` enters a new tenth of ``total``,
    so that a log gets ten lines at most."""
    shown = [0]

    def gate(step: int, total: int, *rest) -> None:
        if step * 10 // total > shown[0]:
            shown[0] = step * 10 // total
            report(step, total, *rest)

    return gate


def _history(space: Workspace, spec: JobSpec, datasets: list[Dataset], progress: Progress) -> HistoryIndex:
    """Stage 1: the history index, cached per (task, data, embedder); built by embedding
    shards of the profile pairs as Ray tasks over the cluster's CPUs."""
    label = "embedding users' histories (cached after the first job)"
    progress.stage(label)

    def on_cluster(texts: list[str]):
        return np.concatenate(_shared_pass(
            progress, label, f"shards of {len(texts)} texts", EMBED_SHARD, texts, spec.embedder,
            min_shard=EMBED_MIN_SHARD, rounds=EMBED_ROUNDS, cost=embedding_cost,
        ))

    return cached_history(space.cache, datasets, spec.embedder, on_cluster)


def _shared_pass(progress: Progress, label: str, unit: str, entry, items: list, *args, failed: str | None = None, **shard_options) -> list | None:
    """One of the job's shared passes (embedding, π_ref, γ): ``entry`` over ``items`` in
    shards on the cluster (``scheduler.map_shards``), its progress shown a tenth at a time as
    "LABEL: DONE/SHARDS UNIT"; the shards' results, in order. With ``failed`` (a notice with a
    ``{cause}``: what each worker does instead), a failed pass is that notice and None."""
    progress.stage(label)
    report = _each_tenth(lambda done, shards: progress.stage(f"{label}: {done}/{shards} {unit}"))
    try:
        return scheduler.map_shards(entry, items, *args, on_done=report, **shard_options)
    except scheduler.TASK_FAILURES as error:
        if failed is None:
            raise
        progress.notice(failed.format(cause=cluster.first_line(cluster.task_cause(error))))
        return None


def _task_adapter(space: Workspace, spec: JobSpec, resources: Resources, progress: Progress) -> str | None:
    """Stage 2: the task adapter's folder, trained once per (task, data, model, config)."""
    if not spec.needs_task_adapter:
        return None
    if spec.task_adapter != "auto":
        return spec.task_adapter
    key = task_adapter_key(spec)
    known = space.registry.task_adapter(key)
    if known is not None and space.artifacts.verify(known["path"], known["sha256"]):
        return known["path"]
    # A folder without a registry entry was written by a driver that died before recording it.
    info = space.artifacts.find(f"task-adapters/{key}") if known is None else None
    if info is None:
        gpus = 1 if resources.gpus_per_user else 0
        cpus = resources.cpus_per_user if gpus else cluster.largest_node_cpus()  # it runs alone: a whole node's cores
        on = "1 GPU" if gpus else f"{cpus} CPUs"
        label = f"training the task adapter on the train split's users (once per task, data and model; {on})"
        progress.stage(label)
        built = scheduler.run_remote(
            BUILD_TASK_ADAPTER, spec.task, spec.data, spec.model, spec.task_adapter_config(), "auto", max(1, int(cpus)),
            num_cpus=cpus, num_gpus=gpus,
            on_step=_each_tenth(lambda step, total, loss: progress.stage(f"{label}: step {step}/{total}, loss {loss:.3f}")),
        )
        info = space.artifacts.write_dir(f"task-adapters/{key}", built["files"])
    space.registry.record_task_adapter(key, spec.task, spec.model, str(info.path), info.sha256, info.bytes)
    return str(info.path)


PROMPT_MIN_SHARD = 16
"""The fewest runs one prompt task composes: each loads the tokenizer and the embedder."""

PROMPT_ROUNDS = 2
"""Prompt shards per CPU: the pass is short, its shards few."""


def _prompt_pass(spec: JobSpec, dataset: Dataset, history: HistoryIndex, planned: list[tuple[TrainConfig, UserItems]], progress: Progress) -> list[tuple[TrainConfig, UserItems]]:
    """``planned`` with the training prompts of every run that reads π_ref and carries retrieved
    items (``--retrieve``) composed as its worker will compose them (``prompts.prompted_items``),
    in CPU shards over the cluster (the driver loads no tokenizer and no embedder), so that
    π_ref's pass covers the pairs those runs train on. A pass that fails leaves those runs out
    of π_ref's pass: their workers compute their own (the same results, slower)."""
    retrieved = {i for i, (config, _) in enumerate(planned) if method_spec(config.method).uses_reference and prompt_kind(config) == "retrieved"}
    if not retrieved:
        return planned
    shards = _shared_pass(
        progress, f"composing the retrieved prompts of {len(retrieved)} runs", "shards", PROMPT_SHARD, [planned[i] for i in sorted(retrieved)],
        spec.task, dataset, history, spec.model,
        failed="the pass composing retrieved prompts failed ({cause}): those runs' workers compute π_ref themselves",
        min_shard=PROMPT_MIN_SHARD, rounds=PROMPT_ROUNDS,
    )
    if shards is None:
        return [run for i, run in enumerate(planned) if i not in retrieved]
    composed = iter(items for shard in shards for items in shard)
    return [(config, next(composed)) if i in retrieved else (config, items) for i, (config, items) in enumerate(planned)]


def _starting_model(spec: JobSpec, tam_path: str | None, resources: Resources) -> str:
    """The fingerprint that names the job's starting model in the home's caches (π_ref's, the
    summaries): its folders and the device kind (``reference_cache.starting_model_fingerprint``)."""
    return starting_model_fingerprint([spec.model, tam_path], "gpu" if resources.gpus_per_user > 0 else "cpu")


REFERENCE_MIN_SHARD = 128
"""The fewest pairs one π_ref task gets: each loads the starting model."""

REFERENCE_ROUNDS = 4
"""π_ref shards per CPU (or GPU): a long pass shows its progress a shard at a time."""


def _planned_items(spec: JobSpec, dataset: Dataset, history: HistoryIndex, pending: list) -> list[tuple[TrainConfig, UserItems]]:
    """What each pending run of a method that reads π_ref or γ or trains on aux items will
    train on, drawn by the workers' own ``user_items``, once for both passes and the record of
    whose items each run draws as aux. A run whose items cannot be planned is left out: its
    worker fails it with the reason."""
    planned = []
    for run in pending:
        config = spec.config_for(run.method)
        method = method_spec(config.method)
        if not (method.uses_reference or method.uses_gamma or method.uses_aux):
            continue
        try:
            planned.append((config, user_items(dataset, history, run.user_id, config)))
        except DataError:
            continue
    return planned


def _reference_pass(
    space: Workspace,
    spec: JobSpec,
    task: Task,
    planned: list[tuple[TrainConfig, UserItems]],
    tam_path: str | None,
    resources: Resources,
    progress: Progress,
) -> dict[bytes, float]:
    """Stage 3: π_ref's log-probs of every (x, y) pair the pending runs of methods that read
    π_ref will train on (positives and aux, planned by the workers' own ``user_items``), each
    pair once for the whole job, in shards over the cluster; pairs that earlier jobs computed
    under the same starting model come from the home's cache (``storage/reference_cache.py``,
    found by their text: only the others go to the cluster, and a job whose pairs are all
    known runs no shard). KTO's mismatched pairs follow in a second pass, once the first has
    told which pairs training keeps (``planned``: see :func:`_planned_items`, with the prompts of
    ``--retrieve`` runs composed by :func:`_prompt_pass`). A pass that fails leaves each worker
    to compute its own (the same results, slower)."""
    groups: dict[tuple, dict[tuple[str, str], None]] = {}
    cycles: dict[tuple, dict[tuple, None]] = {}  # KTO's: each user's pairs in training order
    for config, items in planned:
        method = method_spec(config.method)
        if not method.uses_reference:
            continue
        key = (task.budgets(config.max_prompt_tokens, config.max_new_tokens), config.eval_batch_size)
        groups.setdefault(key, {}).update(dict.fromkeys(trained_pairs([items])))
        if method.mismatched:
            cycles.setdefault(key, {})[tuple((e.x, e.y) for e in (*items.positives, *items.auxiliary))] = None
    if not groups:
        return {}
    cache = ReferenceCache(space.cache / "reference" / _starting_model(spec, tam_path, resources))
    known = cache.load()
    entries: dict[bytes, Entry] = {}
    asked: set[bytes] = set()

    def resolve(pairs: list[tuple[str, str]], budgets, batch_size: int, what: str) -> None:
        """Put every pair's entry in ``entries``: from the cache, else computed on the cluster."""
        keyed = {pair_text_key(x, y, budgets.prompt_tokens, budgets.new_tokens): (x, y) for x, y in pairs}
        asked.update(keyed)
        missing = []
        for key, pair in keyed.items():
            if key in known:
                entries[key] = known[key]
            else:
                missing.append(pair)
        if not missing:
            return
        shards = _shared_pass(
            progress, f"π_ref's pass over {len(missing)} {what}", "shards", REFERENCE_SHARD, missing, spec.model, tam_path, budgets, batch_size,
            failed="π_ref's shared pass failed ({cause}): each worker computes its own",
            min_shard=REFERENCE_MIN_SHARD, gpus=resources.gpus_per_user > 0, rounds=REFERENCE_ROUNDS, cost=lambda pair: len(pair[0]) + len(pair[1]),
        )
        for shard in shards or []:
            entries.update(shard)

    for (budgets, batch_size), pairs in groups.items():
        resolve(list(pairs), budgets, batch_size, "pairs (once per job, shared by its users and methods)")
        mismatched = _mismatched(cycles.get((budgets, batch_size), {}), entries, budgets)
        if mismatched:
            resolve(mismatched, budgets, batch_size, "mismatched pairs (KTO's, each user's own)")
    new = {key: entry for key, entry in entries.items() if key not in known}
    if new:
        cache.save({**known, **new})
    found = sum(key in known for key in asked)
    if found:
        progress.notice(f"π_ref: {found} of {len(asked)} pairs known from earlier jobs on this starting model")
    return {entry[0]: entry[1] for entry in entries.values() if not is_left_out(entry)}


def _mismatched(cycles: Iterable[tuple[tuple[str, str], ...]], entries: dict[bytes, Entry], budgets) -> list[tuple[str, str]]:
    """KTO's mismatched pairs of each user's pairs in training order, over the pairs training
    keeps (not ``LEFT_OUT``), as its worker forms them; a user with a pair
    whose entry is missing (its pass failed) is left to its worker."""
    pairs: dict[tuple[str, str], None] = {}
    for cycle in cycles:
        keys = [pair_text_key(x, y, budgets.prompt_tokens, budgets.new_tokens) for x, y in cycle]
        if all(key in entries for key in keys):
            kept = [pair for pair, key in zip(cycle, keys) if not is_left_out(entries[key])]
            pairs.update(dict.fromkeys(mismatched_pairs(kept)))
    return list(pairs)


GAMMA_MIN_SHARD = 16
"""The fewest runs one γ task estimates (about 0.2 s each on one core)."""

GAMMA_ROUNDS = 4
"""γ shards per CPU: a long pass shows its progress a shard at a time."""


def _gamma_pass(history: HistoryIndex, planned: list[tuple[TrainConfig, UserItems]], progress: Progress) -> dict:
    """Stage 3b: the γ of every planned run whose method estimates one, by its inputs (the
    rows of the user's positives and aux items as its worker will draw them, and the
    estimator's settings: ``user_items.gamma_inputs``), each distinct input once for the whole
    job (C-BPO's variants share their users' draws), in CPU shards over the cluster. A GPU
    worker then starts training at once instead of estimating its pack's γ one user at a time
    on its own CPU. A pass that fails leaves each worker to estimate its own (the same γ)."""
    inputs = dict.fromkeys(key for config, items in planned if (key := gamma_inputs(items, config)) is not None)
    if not inputs:
        return {}
    shards = _shared_pass(
        progress, f"γ's pass over {len(inputs)} users' items (once per job, shared by its C-BPO methods)", "shards", GAMMA_SHARD, list(inputs), history,
        failed="γ's shared pass failed ({cause}): each worker estimates its own", min_shard=GAMMA_MIN_SHARD, rounds=GAMMA_ROUNDS,
    )
    return {key: gamma for shard in shards or [] for key, gamma in shard.items()}


def _fan_out(
    space: Workspace, job_id: str, resources: Resources, pending: list, setup: scheduler.WorkerSetup, spec: JobSpec, progress: Progress, lease: JobLease,
    summaries: SummaryCache, incumbents: dict[tuple[str, str], Incumbent],
) -> None:
    registry = space.registry
    runs = {run.run_id: run for run in pending}
    tally = _Tally()
    sizes = Counter(example.user_id for example in setup.history.examples)
    work = packing.largest_first([packing.Work(run.run_id, run.user_id, spec.config_for(run.method)) for run in pending], sizes)
    attempts: dict[int, int] = {}

    def report() -> None:
        tally.reported = time.perf_counter()
        counts = registry.job(job_id).counts
        hours = (time.perf_counter() - tally.started) / 3600
        progress.runs(counts, tally.finished / hours if tally.finished and hours > 0 else None)

    def tick() -> None:
        if time.perf_counter() - tally.reported >= REPORT_EVERY_S:
            report()

    def start(unit: packing.Work) -> bool:
        lease.check()
        try:
            attempts[unit.key] = registry.mark_running(unit.key).attempts
        except InvalidTransition:
            return False
        return True

    def finish(unit: packing.Work, result) -> list[packing.Work]:
        lease.check()
        run = runs[unit.key]
        retry: list[packing.Work] = []
        if isinstance(result, packing.Failure):
            final = not result.shared and (result.permanent or attempts[unit.key] > resources.max_retries)
            registry.record_failure(unit.key, result.error, final=final)
            if not final:
                retry.append(unit)
        else:
            _record(space, job_id, run, attempts[unit.key], result, summaries, incumbents.get((run.user_id, run.method)))
        if not retry:
            tally.finished += 1
        return retry

    fit = scheduler.worker_fit(setup)
    slots = resources.workers or fit.workers
    if slots > fit.workers:  # an actor that cannot be placed never starts, and the work sent to it would wait forever
        progress.notice(f"--workers {slots} is more than the cluster fits now ({fit}): running {fit.workers}")
        slots = fit.workers
    report()
    scheduler.fan_out(work, setup, slots, start, finish, tick, resources.pack_size)
    report()


def _record(space: Workspace, job_id: str, run, attempt: int, outcome: UserOutcome, summaries: SummaryCache, incumbent: Incumbent | None) -> None:
    """Write the adapter atomically (its own folder per attempt), then record the run once, with
    the score of the ``incumbent`` its worker measured on the run's items (promotion compares
    the two); a PAG summary its worker wrote goes to the home's cache, for later jobs."""
    adapter = None
    if outcome.adapter_files:
        info = space.artifacts.write_dir(f"adapters/{job_id}/{run.user_id}/{run.method}/attempt-{attempt}", outcome.artifact_files())
        adapter = info.as_dict()
    m = outcome.metrics
    metrics = {
        "rouge1": m["rouge1"],
        "rougeL": m["rougeL"],
        "gamma": m["gamma"],
        "gamma_reason": m["gamma_reason"],
        "n_pos": m["n_pos"],
        "n_aux": m["n_aux"],
        "seconds": m["seconds"],
        "phase_seconds": m["phase_seconds"],
        "extra": {"losses": m["losses"], "selection": m["selection"], "evaluation": m["evaluation"], "prompting": m["prompting"], "predictions": outcome.predictions},
    }
    parent = None if incumbent is None else ParentScore(incumbent.version_id, outcome.incumbent_rouge1)
    space.registry.record_success(run.run_id, metrics, adapter, parent)
    prompting = m["prompting"]
    if prompting.get("summary_key") and not prompting["summary_cached"]:
        summaries.keep(run.user_id, prompting["summary_key"], {k: prompting[k] for k in ("summary", "summary_items", "summary_finish")})
