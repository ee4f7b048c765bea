"""Build a task adapter for a job: a plain function, run by a Ray task or called directly."""

from __future__ import annotations

from dataclasses import replace

from cbpo_orch.method.data import load_split
from cbpo_orch.method.models import load_model
from cbpo_orch.method.task_adapter import TASK_ADAPTER_CONFIG, train_task_adapter
from cbpo_orch.method.tasks import load_task
from cbpo_orch.workers.context import TASK_ADAPTER_SPLIT


def task_adapter_config(max_profile: int | None, max_length: int):
    return replace(TASK_ADAPTER_CONFIG, max_profile=max_profile, max_length=max_length)


def build_task_adapter(task: str, data: str, model: str, max_profile: int | None, max_length: int, device: str = "auto") -> dict:
    """Train the task adapter on the data's train split; returns its files and losses."""
    dataset = load_split(data, TASK_ADAPTER_SPLIT, load_task(task))
    files, result = train_task_adapter(load_model(model, device), dataset, task_adapter_config(max_profile, max_length))
    return {"files": files, "epoch_losses": result.epoch_losses, "seconds": result.seconds}
