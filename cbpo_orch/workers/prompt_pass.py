"""One shard of the job's prompt pass: the training prompts of the runs that carry retrieved
items (``--retrieve``), composed as their workers will compose them, so that the job's π_ref
pass covers the very pairs they train on. A plain function, run as a Ray task per shard by the
driver; it loads the tokenizer (the budget's measure) and the embedder, never the model."""

from __future__ import annotations

import torch

from cbpo_orch.data.dataset import Dataset
from cbpo_orch.data.history import HistoryIndex
from cbpo_orch.data.tasks import load_task
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.training.models import LoadedModel, load_tokenizer
from cbpo_orch.workers.prompts import prompted_items
from cbpo_orch.workers.user_context import UserContext
from cbpo_orch.workers.user_items import UserItems


def prompt_shard(
    planned: list[tuple[TrainConfig, UserItems]], task_name: str, dataset: Dataset, history: HistoryIndex, model: str, threads: int
) -> list[UserItems]:
    """Each run's items with its prompts composed (``prompts.prompted_items``), in order."""
    torch.set_num_threads(max(1, threads))
    task = load_task(task_name)
    context = UserContext(task, dataset, history, LoadedModel(None, load_tokenizer(model), torch.device("cpu"), model))
    return [prompted_items(context, items, config, task.budgets(config.max_prompt_tokens, config.max_new_tokens)) for config, items in planned]
