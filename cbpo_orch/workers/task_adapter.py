"""Build a task adapter for a job: a plain function, run by a Ray task or called directly."""

from __future__ import annotations

import torch

from cbpo_orch.data.dataset import load_split
from cbpo_orch.data.tasks import load_task
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.training.models import load_model
from cbpo_orch.training.task_adapter import train_task_adapter
from cbpo_orch.training.trainer import StepCallback
from cbpo_orch.workers.context import TASK_ADAPTER_SPLIT


def build_task_adapter(task: str, data: str, model: str, config: TrainConfig, device: str = "auto", threads: int | None = None, on_step: StepCallback | None = None) -> dict:
    """Train the task adapter on the data's train split, on ``threads`` CPU threads (all of
    the process's by default); returns its files and losses."""
    if threads is not None:
        torch.set_num_threads(threads)
    dataset = load_split(data, TASK_ADAPTER_SPLIT, load_task(task))
    files, result = train_task_adapter(load_model(model, device), dataset, config, on_step)
    return {"files": files, "epoch_losses": result.epoch_losses, "seconds": result.seconds}
