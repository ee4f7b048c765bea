"""Commands for a job's life after it ran: update it on new data, roll a user's adapter back,
forget a user, read the audit log."""

from __future__ import annotations

from dataclasses import replace
from typing import Annotated, Optional

import typer

from cbpo_orch.cli.app import HomeOpt, UsageError, app
from cbpo_orch.cli.job_commands import AddressOpt, ArtifactsOpt, DbOpt, JobArg, open_workspace, run_watched
from cbpo_orch.storage.models import PROMOTE_POLICIES


@app.command()
def update(
    job: JobArg,
    data: Annotated[str, typer.Option(help="The new version of the job's data set (any form `submit --data` reads), holding the same split.")],
    users: Annotated[str, typer.Option(help="Which users of the new data to compare: 'all', N (the first N) or id,id,…. The job's other users are carried over.")] = "all",
    promote: Annotated[str, typer.Option(help="check: a new version becomes current only if its score is not below the current one's on the same items (the current adapter is scored again on the new data's queries and evaluation items), else it is kept as rejected; always: every new version becomes current, with no extra scoring.")] = "check",
    home: HomeOpt = None,
    db: DbOpt = None,
    artifacts: ArtifactsOpt = None,
    address: AddressOpt = None,
) -> None:
    """Update a job on new data: train only the users that are new or whose history changed
    (same task, model, methods and options), and carry every other user's adapter over by
    reference. Prints the update job's id; `cbpo-orch resume` finishes it after a crash."""
    from cbpo_orch.orchestrator.spec import check_address
    from cbpo_orch.orchestrator.update import start_update

    if promote not in PROMOTE_POLICIES:
        raise UsageError(f"--promote must be one of {', '.join(PROMOTE_POLICIES)}")
    check_address(address)
    space = open_workspace(home, db, artifacts, writes=True)
    job_id, plan, resources = start_update(space, job, data, users, promote)
    typer.echo(f"update of job {job}: {plan.summary()}", err=True)
    if job_id is None:
        typer.echo("nothing to train: no job made", err=True)
        return
    typer.echo(job_id)
    resources = replace(resources, address=address or resources.address)
    run_watched(space, job_id, resources)
    _print_decisions(space.registry.versions(job_id), job_id)


def _print_decisions(versions: list[dict], job_id: str) -> None:
    """One line per version the update trained: promoted or rejected, with the scores."""
    for row in versions:
        if row["job_id"] != job_id:
            continue
        against = "" if row["parent"] is None else f" against v{row['parent']} ({_score(row['parent_score'])})"
        typer.echo(f"{row['user_id']} · {row['method']}: v{row['version']} {row['state']}, score {_score(row['score'])}{against}", err=True)


def _score(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


@app.command()
def rollback(
    user: Annotated[str, typer.Argument(help="User id.")],
    job: Annotated[str, typer.Option(help="A job of the line (the submitted job or any of its updates).")],
    method: Annotated[Optional[str], typer.Option(help="One method (default: every method of the job).")] = None,
    home: HomeOpt = None,
    db: DbOpt = None,
) -> None:
    """Make the previous version of a user's adapter current again (the current one becomes rolled-back)."""
    registry = open_workspace(home, db, None).registry
    info = registry.job(job)
    if method is not None and method not in info.methods:
        raise UsageError(f"job {job} did not run method {method!r} (its methods: {', '.join(info.methods)})")
    done = registry.rollback(job, user, None if method is None else [method])
    if not done:
        raise UsageError(f"user {user!r} has no current version with an earlier one in the line of job {job} (see `cbpo-orch results {job} --versions`)")
    for name, was, now in done:
        typer.echo(f"{user} · {name}: v{now} current again (v{was} rolled back)")


@app.command()
def forget(
    user: Annotated[str, typer.Argument(help="User id.")],
    job: Annotated[Optional[str], typer.Option(help="Only this job's line (the submitted job and its updates); the home's caches are cleaned either way.")] = None,
    home: HomeOpt = None,
    db: DbOpt = None,
    artifacts: ArtifactsOpt = None,
) -> None:
    """Forget a user: delete its adapters (every version), predictions, metrics and runs, its
    rows of the cached history indexes (the aux pool of future training) and the π_ref caches
    holding its pairs; say which other users' adapters trained on its items as aux items; and
    write an audit line that names the user only by a digest. Remove the user from your data
    set too, or a later update trains it again as a new user."""
    from cbpo_orch.orchestrator.forget import UserInUse, forget_user

    space = open_workspace(home, db, artifacts, writes=True)
    try:
        report = forget_user(space, user, job)
    except UserInUse as busy:
        raise UsageError(str(busy)) from None
    counts = report.counts()
    typer.echo(
        f"forgot {user}: {counts['runs']} runs and {counts['versions']} adapter versions in {counts['jobs']} jobs, "
        f"{counts['adapter_folders']} adapter folders, {counts['history_rows']} cached history rows, "
        f"{counts['reference_caches']} π_ref cache files, the PAG summaries of {counts['summary_caches']} starting models"
    )
    if not report.erased:
        typer.echo(f"the registry's write-ahead log was in use and may still hold the deleted rows' bytes: run `cbpo-orch forget {user}` again", err=True)
    if report.aux_users_of:
        typer.echo(f"{len(report.aux_users_of)} runs of other users trained on its items as aux items (retrain them to remove their influence):")
        for other, method, job_id in report.aux_users_of:
            typer.echo(f"  {other} · {method} · job {job_id}")
    else:
        typer.echo("no recorded run of another user trained on its items as aux items (recorded since registry schema 5)")


@app.command()
def audit(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable JSON.")] = False,
    home: HomeOpt = None,
    db: DbOpt = None,
) -> None:
    """The audit log, oldest first: when, who, what was done (forget) to which user (named by a
    digest of its id only) and what was removed."""
    import json

    entries = open_workspace(home, db, None).registry.audit_log()
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    for entry in entries:
        typer.echo(f"{entry['at']} {entry['actor']} {entry['action']} {entry['subject']} {json.dumps(entry['detail'], sort_keys=True)}")
