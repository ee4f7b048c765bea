"""Commands that put a job's adapters to use: export them for vLLM / Ray Serve LLM, serve them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cbpo_orch.cli.app import HomeOpt, app, fresh_output_dir, staged_folder
from cbpo_orch.cli.job_commands import DbOpt, open_workspace

JobOpt = Annotated[str, typer.Option(help="Job id (see `cbpo-orch status`).")]
MethodOpt = Annotated[str, typer.Option(help="Which of the job's methods' adapters (one that trains: sft, kto, bco, cbpo, …).")]


@app.command()
def export(
    job: JobOpt,
    out: Annotated[Path, typer.Option(help="Folder to write into (must not exist, or be empty).")],
    method: MethodOpt = "cbpo",
    home: HomeOpt = None,
    db: DbOpt = None,
) -> None:
    """Export a job's adapters as vLLM / Ray Serve LLM load them: OUT/<user_id>/ per user
    (adapter_config.json + adapter_model.safetensors), OUT/base/ (the merged starting model,
    when the job used a task adapter) and OUT/manifest.json. Every adapter is checked first
    (rank, target modules, no modules_to_save); when one cannot be served nothing is written."""
    from cbpo_orch.serving.catalog import load_catalog
    from cbpo_orch.serving.export import export_job

    out = fresh_output_dir(out)
    space = open_workspace(home, db, None)
    catalog = load_catalog(space, job, method)
    with staged_folder(out) as staging:
        manifest = export_job(space, catalog, staging)
    for user, reason in manifest["not_exported"].items():
        typer.echo(f"not exported: {user} ({reason})", err=True)
    base = manifest["base_model"]["path"]
    typer.echo(f"exported {len(manifest['users'])} {method} adapters of job {job} to {out} (base model: {base}; max_lora_rank {manifest['max_lora_rank']})", err=True)
    typer.echo(str(out))


PANEL = "Layout"


@app.command()
def serve(
    job: JobOpt,
    method: MethodOpt = "cbpo",
    host: Annotated[str, typer.Option(help="Address the HTTP endpoint binds. Anything but loopback needs --api-keys.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port of the HTTP endpoint.")] = 8000,
    api_keys: Annotated[Optional[Path], typer.Option(help="JSON or TOML file mapping each API key to the user ids it may use, or \"*\" (an operator key). Requests then need `Authorization: Bearer KEY`.")] = None,
    address: Annotated[Optional[str], typer.Option(help="Ray cluster: 'auto' (RAY_ADDRESS or a local `ray start`) or ray://HOST:10001. Default: start a local Ray.")] = None,
    replicas: Annotated[int, typer.Option(help="Replicas of the model, each holding its own adapters.", rich_help_panel=PANEL)] = 1,
    max_adapters_per_replica: Annotated[int, typer.Option(help="Users' adapters a replica keeps loaded (LRU); a user's requests go to a replica that holds its adapter.", rich_help_panel=PANEL)] = 32,
    max_batch_size: Annotated[int, typer.Option(help="Requests (of any users) answered together in one batched generate; 1 turns cross-user batching off.", rich_help_panel=PANEL)] = 16,
    batch_wait_ms: Annotated[float, typer.Option(help="How long a batch waits for more requests once the first has come.", rich_help_panel=PANEL)] = 20.0,
    cpus_per_replica: Annotated[float, typer.Option(help="CPUs per replica (its torch threads).", rich_help_panel=PANEL)] = 1.0,
    gpus_per_replica: Annotated[float, typer.Option(help="GPUs per replica (> 0: the model runs on a GPU).", rich_help_panel=PANEL)] = 0.0,
    follow_every: Annotated[float, typer.Option(help="Seconds between two reads of what is current in the registry and of --api-keys: new users, new current versions (update, promotion, rollback), forgotten users and changed keys are served within this time, without a restart.")] = 2.0,
    home: HomeOpt = None,
    db: DbOpt = None,
) -> None:
    """Serve the current adapter version of every user of a job's line behind one
    OpenAI-compatible endpoint on Ray Serve: POST /v1/completions (`model` = a user id, or the
    base model's name), GET /v1/models. It follows the registry while it runs (see
    --follow-every). Runs until Ctrl-C."""
    import threading
    from datetime import datetime

    from cbpo_orch.cli.app import UsageError
    from cbpo_orch.orchestrator.cluster import dashboard_notice
    from cbpo_orch.serving import app as serving
    from cbpo_orch.serving.catalog import load_catalog, served_users
    from cbpo_orch.serving.follow import Follower
    from cbpo_orch.serving.keys import load_api_keys

    if api_keys is None and not serving.is_loopback(host):
        raise UsageError(
            f"refusing to serve on {host} without --api-keys: every user's adapter would be open to anyone who reaches it; "
            "give --api-keys FILE, or bind loopback (--host 127.0.0.1)"
        )
    if not 1 <= port <= 65535:
        raise UsageError("--port must be from 1 to 65535")
    if not follow_every > 0:
        raise UsageError("--follow-every must be > 0 seconds")
    options = serving.ServeOptions(replicas, max_adapters_per_replica, max_batch_size, batch_wait_ms / 1000, cpus_per_replica, gpus_per_replica)
    keys = load_api_keys(api_keys) if api_keys is not None else None
    space = open_workspace(home, db, None)
    catalog = load_catalog(space, job, method)
    typer.echo(f"job {job}: starting {replicas} replica(s) of {catalog.base_name} with {len(catalog.servable)} {method} adapters …", err=True)
    dashboard = serving.start(catalog, keys, options, host, port, address)
    try:
        typer.echo(f"serving job {job} ({method}) at http://{host}:{port}/v1 : POST /v1/completions, GET /v1/models; model = a user id or {catalog.base_name!r}")
        typer.echo(("API keys required (Authorization: Bearer KEY)" if keys else "no API keys: loopback only"), err=True)
        if dashboard:
            typer.echo(f"{dashboard_notice(dashboard)} (its Serve tab shows the application)", err=True)
        typer.echo(f"following the registry every {follow_every:g} s; Ctrl-C stops the server.", err=True)
        follower = Follower(lambda: served_users(space.registry, job, method), serving.RunningIngress(catalog), catalog.users, api_keys, keys)
        follower.run(follow_every, threading.Event(), lambda line: typer.echo(f"{datetime.now():%H:%M:%S} {line}", err=True))
    except KeyboardInterrupt:
        typer.echo("stopping …", err=True)
    finally:
        serving.stop(catalog)
