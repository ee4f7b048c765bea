"""The server's side of ``--retrieve``: a request of a user is answered on the prompt its
queries were answered on in evaluation, after the user's retrieved items
(``workers/prompts.served_prompt``), so that a served answer is the recorded prediction.

The ingress loads what that takes once: the job's split (the users' items), its history
index (the items' embeddings) and the tokenizer that measures the budget; the embedder is
loaded on the first request.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cbpo_orch.data.dataset import load_split
from cbpo_orch.data.history import HistoryIndex
from cbpo_orch.data.tasks import Task
from cbpo_orch.serving.catalog import ServedRetrieval
from cbpo_orch.training.models import LoadedModel
from cbpo_orch.workers.user_context import UserContext


def served_context(retrieval: ServedRetrieval, task: Task, tokenizer, model_path: str) -> UserContext:
    """What composing a served prompt reads: the users' items and their embeddings, and the
    tokenizer (no model: nothing is generated here)."""
    dataset = load_split(retrieval.data, retrieval.split, task)
    history = HistoryIndex.load(Path(retrieval.history), retrieval.embedder)
    return UserContext(task, dataset, history, LoadedModel(None, tokenizer, torch.device("cpu"), model_path))
