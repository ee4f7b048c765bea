"""Commands for multi-user jobs: submit, status, results, resume, cancel, generate."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from cbpo_orch.cli.app import DeviceOpt, HomeOpt, ModelOpt, UsageError, app, resolve_model
from cbpo_orch.cli.progress import job_progress
from cbpo_orch.cli.training_options import build_config, with_training_options
from cbpo_orch.data.tasks import load_task
from cbpo_orch.home import home_dir
from cbpo_orch.method.methods import METHOD_CHOICES
from cbpo_orch.orchestrator.spec import JobSpec, Resources, parse_methods, plan_job
from cbpo_orch.storage.lineage import VERSION_COLUMNS
from cbpo_orch.storage.registry import RESULT_COLUMNS, resume_advice

DbOpt = Annotated[Optional[str], typer.Option(help="Registry as a SQLAlchemy URL, e.g. postgresql+psycopg://… (env CBPO_ORCH_DB; default SQLite in the home folder).")]
ArtifactsOpt = Annotated[Optional[Path], typer.Option(help="Artifact folder (env CBPO_ORCH_ARTIFACTS; default <home>/artifacts).")]
AddressOpt = Annotated[Optional[str], typer.Option(help="Ray cluster: 'auto' (RAY_ADDRESS or a local `ray start`) or ray://HOST:10001. Default: start a local Ray.")]
JobArg = Annotated[str, typer.Argument(help="Job id (see `cbpo-orch status`).")]
PANEL = "Scheduling"
SCORES = ("rouge1", "rougeL")
VERSUS_BASE = ("rouge1_vs_base", "rouge1_vs_base_low", "rouge1_vs_base_high")
"""``results --aggregate``: a method's mean per-user ROUGE-1 difference from ``base`` and its CI."""
NO_SCORE = "n/a"
"""How ``results`` shows a score that does not exist: the user had no gold output (JSON: null)."""
OUT = Console()
if not OUT.is_terminal:
    OUT.width = 200


def open_workspace(home: Path | None, db: str | None, artifacts: Path | None, writes: bool = False):
    from cbpo_orch.orchestrator.workspace import Workspace

    return Workspace.open(home_dir(home), db, artifacts, writes)


def _print_examples(extras: dict, users, methods) -> None:
    """Per user, the first query's gold and every method's output: what personalization did."""
    for user in users:
        runs = {m: extras[(user, m)]["predictions"][0] for m in methods if extras.get((user, m), {}).get("predictions")}
        if not runs:
            continue
        first = next(iter(runs.values()))
        OUT.print(f"\n[bold]{user}[/bold] · query {first['id']}", highlight=False)
        OUT.print(f"  {'gold':>8}: {NO_SCORE if first['gold'] is None else first['gold']}", highlight=False, markup=False)
        for method, run in runs.items():
            OUT.print(f"  {method:>8}: {run['prediction']}", highlight=False, markup=False)


def run_watched(space, job_id: str, resources: Resources | None, examples: int = 0) -> None:
    """Drive the job in a child process that this one watches (``driver_process.py``) and
    exit with its code; where the driver died without a word, say so and what to run."""
    from cbpo_orch.cli.driver_process import OWN_EXITS, run_in_child

    code = run_in_child(_drive, space.registry.url, space.artifacts.root, space.cache, job_id, resources, examples)
    if code not in OWN_EXITS or (code == 1 and space.registry.job(job_id).state == "running"):
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        typer.echo(
            f"error: the driver of job {job_id} died ({how}) before the job finished (it was killed, or Ray ended it because "
            f"its cluster went away); {resume_advice(job_id)}",
            err=True,
        )
        code = 1
    if code:
        sys.exit(code)


def _drive(url: str, artifacts: Path, cache: Path, job_id: str, resources: Resources | None, examples: int) -> int:
    """The driver process: run the job, print its results; returns the exit code."""
    from cbpo_orch.cli.app import USER_ERRORS
    from cbpo_orch.cli.driver_process import EXIT_LEASE_LOST
    from cbpo_orch.orchestrator.driver import NoSpaceLeft, run_job
    from cbpo_orch.orchestrator.lease import LeaseLost
    from cbpo_orch.orchestrator.cluster import ClusterLost
    from cbpo_orch.orchestrator.workspace import Workspace
    from cbpo_orch.storage.artifacts import ArtifactStore
    from cbpo_orch.storage.registry import Registry

    space = Workspace(Registry(url), ArtifactStore(artifacts), cache)
    job = space.registry.job(job_id)
    total = len(job.users) * len(job.methods)
    typer.echo(f"job {job_id}: {len(job.users)} users × {len(job.methods)} methods ({', '.join(job.methods)})", err=True)
    try:
        with job_progress(total) as progress:
            state = run_job(space, job_id, resources, progress)
    except KeyboardInterrupt:
        typer.echo(f"interrupted; {resume_advice(job_id)}", err=True)
        return 130
    except LeaseLost as lost:
        typer.echo(f"error: {lost}", err=True)
        return EXIT_LEASE_LOST
    except ClusterLost as lost:
        typer.echo(f"error: {lost}; {resume_advice(job_id)}", err=True)
        return 1
    except NoSpaceLeft as full:
        typer.echo(f"error: {full}; {resume_advice(job_id, 'free space')}", err=True)
        return 1
    except USER_ERRORS as error:
        typer.echo(f"error: {error}", err=True)
        return 2
    _print_results(space.registry.results(job_id), "table", aggregate=True)
    _print_examples(space.registry.extras(job_id), job.users[:examples], job.methods)
    failed = space.registry.runs(job_id, states=("failed",))
    for run in failed:
        typer.echo(f"failed: {run.user_id} · {run.method} after {run.attempts} attempts: {run.error}", err=True)
    typer.echo(f"job {job_id} {state}. Details: cbpo-orch results {job_id}", err=True)
    return 0 if state == "succeeded" else 1


def _data_line(data: str, split: str) -> str:
    """What a job reads, said once at submit: the data set (a hub id's config apart) and the
    split under the name the data set holds it by, where that differs from ``--split``."""
    from cbpo_orch.data.sources import HubDataset, open_source

    source = open_source(data)
    held = source.held(split)
    where = f"{source.name}, config {source.config}" if isinstance(source, HubDataset) and source.config else data
    return f"{where}, split {held!r}" + (f" (for --split {split})" if held != split else "")


@app.command()
@with_training_options
def submit(
    task: Annotated[str, typer.Option(help="Built-in task or a task definition JSON file.")] = "lamp4",
    data: Annotated[Optional[str], typer.Option(help="Data set: a folder (LaMP/LongLaMP JSON, parquet shards or a `datasets` save_to_disk folder), a parquet file, or a hub id OWNER/NAME[:CONFIG] (read through the `datasets` cache). Default: LongLaMP/LongLaMP's user config for longlamp2/3/4, else the shipped HuffPost sample.")] = None,
    model: ModelOpt = None,
    users: Annotated[str, typer.Option(help="'all', N (the first N test users) or id,id,….")] = "3",
    method: Annotated[str, typer.Option(help=f"One or more methods, comma-separated: {METHOD_CHOICES}.")] = "cbpo",
    split: Annotated[str, typer.Option(help="Split holding the test users.")] = "dev",
    task_adapter: Annotated[str, typer.Option(help="none | auto (train once on the train split, then reuse) | a task adapter folder.")] = "none",
    task_adapter_lr: Annotated[float, typer.Option(help="Learning rate of an `auto` task adapter (LoRA r=16 on q/k/v/o, SFT).")] = 1e-4,
    task_adapter_epochs: Annotated[int, typer.Option(help="Epochs of an `auto` task adapter.")] = 3,
    embedder: Annotated[Optional[str], typer.Option(help="Sentence-embedding model folder (default: bundled all-MiniLM-L6-v2).")] = None,
    home: HomeOpt = None,
    db: DbOpt = None,
    artifacts: ArtifactsOpt = None,
    address: AddressOpt = None,
    cpus_per_user: Annotated[float, typer.Option(help="CPUs per user's worker (torch threads).", rich_help_panel=PANEL)] = 1.0,
    gpus_per_user: Annotated[float, typer.Option(help="GPUs per user's worker; fractional packs several users on one GPU.", rich_help_panel=PANEL)] = 0.0,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (each loads the model once). Default: as many as the cluster fits.", rich_help_panel=PANEL)] = None,
    max_retries: Annotated[int, typer.Option(help="Retries of a failed user before it is marked failed.", rich_help_panel=PANEL)] = 2,
    users_per_step: Annotated[Optional[int], typer.Option(help="Users of one method sent to a worker at once, trained in the same forward/backward passes, as many at a time as the GPU's memory holds (each user's result is the one it gets alone). Default: 32 for a worker with a whole GPU, else 1 (packing pays on a GPU, not on a CPU).", rich_help_panel=PANEL)] = None,
    examples: Annotated[int, typer.Option(help="At the end, show one query of the first N users: the gold and each method's output.")] = 3,
    options: Optional[dict] = None,
) -> None:
    """Personalize many users: one LoRA adapter per (user, method), fanned out over Ray."""
    methods = parse_methods(method)
    train = build_config(methods[0], options)
    resources = Resources(address, cpus_per_user, gpus_per_user, workers, max_retries, users_per_step)
    spec = plan_job(
        task=task, data=data, model=resolve_model(model, home), users=users, methods=methods, split=split, train=train,
        task_adapter=task_adapter, task_adapter_lr=task_adapter_lr, task_adapter_epochs=task_adapter_epochs, embedder=embedder, address=address,
    )

    space = open_workspace(home, db, artifacts, writes=True)
    typer.echo(f"data: {_data_line(spec.data, split)}", err=True)
    job_id = space.registry.create_job(load_task(spec.task).name, list(methods), list(spec.users), spec.to_config(resources))
    typer.echo(job_id)
    run_watched(space, job_id, resources, examples)


@app.command()
def resume(
    job: JobArg,
    address: AddressOpt = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes (default: as submitted).")] = None,
    home: HomeOpt = None,
    db: DbOpt = None,
    artifacts: ArtifactsOpt = None,
) -> None:
    """Finish a job after a crash or Ctrl-C: runs what has not succeeded; nothing is redone."""
    space = open_workspace(home, db, artifacts, writes=True)
    info = space.registry.job(job)
    if info.state == "cancelled":
        raise UsageError(f"job {job} was cancelled; submit it again instead")
    _, stored = JobSpec.from_config(info.config)
    resources = replace(stored, address=address or stored.address, workers=workers or stored.workers)
    run_watched(space, job, resources)


@app.command()
def cancel(job: JobArg, home: HomeOpt = None, db: DbOpt = None) -> None:
    """Cancel a job: its pending users are not started; running ones finish."""
    space = open_workspace(home, db, None)
    n = space.registry.cancel(job)
    typer.echo(f"job {job}: {n} pending runs cancelled")


def _job_dict(info) -> dict:
    return {
        "job_id": info.job_id,
        "task": info.task,
        "methods": list(info.methods),
        "state": info.state,
        "created_at": info.created_at,
        "finished_at": info.finished_at,
        "users": len(info.users),
        "counts": {k: info.counts[k] for k in ("pending", "running", "succeeded", "failed")},
        "error": info.error,
        "line_id": info.line_id,
        "parent_job_id": info.parent_job_id,
    }


@app.command()
def status(
    job: Annotated[Optional[str], typer.Argument(help="One job's id (default: all jobs).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON.")] = False,
    home: HomeOpt = None,
    db: DbOpt = None,
) -> None:
    """Show jobs and their progress (all jobs, newest first, or one job in detail)."""
    registry = open_workspace(home, db, None).registry
    jobs = [registry.job(job)] if job else registry.jobs()
    if as_json:
        typer.echo(json.dumps([_job_dict(j) for j in jobs], indent=2))
        return
    table = Table("job", "task", "methods", "users", "state", "✓", "✗", "▶", "pending", "created")
    for info in jobs:
        c = info.counts
        table.add_row(info.job_id, info.task, ",".join(info.methods), str(len(info.users)), info.state, str(c["succeeded"]), str(c["failed"]), str(c["running"]), str(c["pending"]), info.created_at[:19])
    OUT.print(table)
    for info in jobs:
        lease = registry.lease(info.job_id) if info.state == "running" else None
        if lease and lease["notice"] and lease["seconds_left"] > 0:  # a live driver's, not a dead one's
            OUT.print(f"{info.job_id}: {lease['notice']}", highlight=False, markup=False)
    if job:
        for run in registry.runs(job, states=("failed",)):
            OUT.print(f"failed: {run.user_id} · {run.method} ({run.attempts} attempts): {run.error}")
        if jobs[0].error:
            OUT.print(f"error: {jobs[0].error}")
        _print_line(registry, jobs[0])


def _print_line(registry, info) -> None:
    """Where the job stands in its line of updates, and the versions it trained."""
    if info.parent_job_id:
        OUT.print(f"update of job {info.parent_job_id} in the line of job {info.line_id} (promote: {info.promote})", highlight=False)
    states = Counter(row["state"] for row in registry.versions(info.job_id) if row["job_id"] == info.job_id)
    if states:
        shown = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        OUT.print(f"adapter versions this job trained: {shown} (`cbpo-orch results {info.job_id} --versions`)", highlight=False)


def _aggregate(rows: list[dict]) -> list[dict]:
    """One row per method: means over its users, and where the job ran ``base``, the mean
    per-user ROUGE-1 difference from it with its paired-bootstrap 95% CI over the users both
    scored (None where fewer than two did: one user has no spread to resample)."""
    from cbpo_orch.training.evaluation import paired_bootstrap_ci

    by_method: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_method[row["method"]].append(row)
    base = {r["user_id"]: r["rouge1"] for r in by_method.get("base", []) if r["rouge1"] is not None}
    out = []
    for method, group in by_method.items():
        mean = lambda key: (sum(r[key] for r in group if r[key] is not None) / n if (n := sum(r[key] is not None for r in group)) else None)  # noqa: E731
        scored = sum(r["rouge1"] is not None for r in group)
        paired = [(r["rouge1"], base[r["user_id"]]) for r in group if r["rouge1"] is not None and r["user_id"] in base]
        versus = paired_bootstrap_ci(*zip(*paired)) if method != "base" and len(paired) >= 2 else (None, None, None)
        out.append({"method": method, "users": len(group), "scored": scored, "rouge1": mean("rouge1"), "rougeL": mean("rougeL"),
                    **dict(zip(VERSUS_BASE, versus)), "gamma": mean("gamma"), "seconds": mean("seconds")})
    return out


def _print_results(rows: list[dict], fmt: str, aggregate: bool) -> None:
    rows = _aggregate(rows) if aggregate else [{k: r[k] for k in RESULT_COLUMNS} for r in rows]
    _print_rows(rows, fmt, RESULT_COLUMNS)


def _print_rows(rows: list[dict], fmt: str, columns: tuple[str, ...]) -> None:
    """``rows`` as JSON, CSV or a table (the table without paths and checksums)."""
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows({**row, **{key: NO_SCORE for key in SCORES if key in row and row[key] is None}} for row in rows)
        typer.echo(buffer.getvalue(), nl=False)
    else:
        columns = list(rows[0]) if rows else list(columns)
        shown = [c for c in columns if c not in ("adapter_path", "sha256", *VERSUS_BASE[1:])]
        table = Table(*("R-1 vs base [95% CI]" if c == VERSUS_BASE[0] else c for c in shown))
        for row in rows:
            table.add_row(*(_versus_cell(row) if c == VERSUS_BASE[0] else _cell(row[c], c) for c in shown))
        OUT.print(table)


def _versus_cell(row: dict) -> str:
    mean, low, high = (row[key] for key in VERSUS_BASE)
    return "—" if mean is None else f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"


def _cell(value, column: str) -> str:
    if value is None:
        return NO_SCORE if column in SCORES else "—"
    if column == "data_fingerprint":
        return value[:12]
    return f"{value:.4f}" if isinstance(value, float) else str(value)


@app.command()
def results(
    job: JobArg,
    fmt: Annotated[str, typer.Option("--format", help="table | csv | json.")] = "table",
    aggregate: Annotated[bool, typer.Option("--aggregate", help="One row per method (means over users) instead of one per (user, method).")] = False,
    versions: Annotated[bool, typer.Option("--versions", help="Instead, every adapter version in the job's line of updates: its state (current, superseded, rejected, rolled-back), the job that trained it, its data fingerprint and number of items, the version it was compared with, and both scores.")] = False,
    home: HomeOpt = None,
    db: DbOpt = None,
) -> None:
    """A job's metrics: one row per (user, method), or means per method over the users scored.
    A user without gold outputs is personalized and answered, and scores n/a. A run an update
    carried over shows the result it refers to."""
    if fmt not in ("table", "csv", "json"):
        raise UsageError("--format must be table, csv or json")
    registry = open_workspace(home, db, None).registry
    registry.job(job)
    if versions:
        _print_rows(registry.versions(job), fmt, VERSION_COLUMNS)
        return
    _print_results(registry.results(job), fmt, aggregate)


@app.command()
def generate(
    text: Annotated[str, typer.Argument(help="The input, e.g. the article to write a headline for.")],
    job: Annotated[str, typer.Option(help="Job id.")],
    user: Annotated[str, typer.Option(help="User id.")],
    method: Annotated[Optional[str], typer.Option(help="Which of the job's methods (default: the first with an adapter).")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Generation length (default: the task's).")] = None,
    home: HomeOpt = None,
    db: DbOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Answer one input with one user's adapter from a finished job."""
    from cbpo_orch.data.dataset import Query
    from cbpo_orch.orchestrator.job_model import loaded_for_job
    from cbpo_orch.training.generation import generate as greedy

    space = open_workspace(home, db, None)
    info = space.registry.job(job)
    rows = [r for r in space.registry.results(job) if r["user_id"] == user and r["adapter_path"] and (method is None or r["method"] == method)]
    if not rows:
        raise UsageError(f"job {job} has no adapter for user {user!r}" + (f" and method {method!r}" if method else ""))
    spec, _ = JobSpec.from_config(info.config)
    task = load_task(spec.task)
    loaded, model = loaded_for_job(space, spec, rows[0]["adapter_path"], device)
    prompt = task.prompt(Query(id="cli", input=text, gold=None))
    budgets = task.budgets(spec.train.max_prompt_tokens, max_new_tokens or spec.train.max_new_tokens)
    [completion] = greedy(model, loaded.tokenizer, [prompt], budgets, 1, loaded.device, decoding=task.decoding)
    typer.echo(completion.text)
