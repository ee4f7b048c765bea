"""Build a task adapter for a job: a plain function, run by a Ray task or called directly."""

from __future__ import annotations

from dataclasses import replace

import torch

from cbpo_orch.data.dataset import load_split
from cbpo_orch.data.tasks import load_task
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.training.models import load_model
from cbpo_orch.training.task_adapter import TASK_ADAPTER_CONFIG, train_task_adapter
from cbpo_orch.training.trainer import StepCallback
from cbpo_orch.workers.context import TASK_ADAPTER_SPLIT


def task_adapter_config(spec) -> TrainConfig:
    """The task adapter's training config for a job: TAM defaults (METHOD.md §6) with the
    job's lr, epochs, profile cap and length budget."""
    train = spec.train
    return replace(TASK_ADAPTER_CONFIG, lr=spec.task_adapter_lr, epochs=spec.task_adapter_epochs, max_profile=train.max_profile, max_prompt_tokens=train.max_prompt_tokens, max_new_tokens=train.max_new_tokens, seed=train.seed)


def build_task_adapter(task: str, data: str, model: str, config: TrainConfig, device: str = "auto", threads: int | None = None, on_step: StepCallback | None = None) -> dict:
    """Train the task adapter on the data's train split, on ``threads`` CPU threads (all of
    the process's by default); returns its files and losses."""
    if threads is not None:
        torch.set_num_threads(threads)
    dataset = load_split(data, TASK_ADAPTER_SPLIT, load_task(task))
    files, result = train_task_adapter(load_model(model, device), dataset, config, on_step)
    return {"files": files, "epoch_losses": result.epoch_losses, "seconds": result.seconds}
