"""What every user of a job shares in a worker process: the task, the data, the history index,
the starting model, π_ref's log-probs and the job's γ. Loaded once per process; the prompt
composer and the personalizer read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cbpo_orch.data.dataset import Dataset
from cbpo_orch.data.history import HistoryIndex
from cbpo_orch.data.tasks import Task
from cbpo_orch.training.models import LoadedModel
from cbpo_orch.training.reference_logps import ReferenceLogps
from cbpo_orch.training.task_adapter import starting_model
from cbpo_orch.workers.gamma_pass import Gamma
from cbpo_orch.workers.user_items import GammaInputs


@dataclass
class UserContext:
    """What every user of a job shares, loaded once per worker process; ``reference``
    holds π_ref's log-probs of the job's pass and of every pair trained so far, for all
    users and methods; ``gammas``: the γ of the job's pass, by their inputs; ``summaries``:
    the PAG summaries the job found in the home's cache, by key (``storage/summary_cache.py``);
    ``incumbents``: the adapter folder of the current version of each (user, method) that a run
    of a checking update trains, scored on the items the new adapter is scored on."""

    task: Task
    dataset: Dataset
    history: HistoryIndex
    loaded: LoadedModel
    reference: ReferenceLogps = field(default_factory=ReferenceLogps)
    gammas: dict[GammaInputs, Gamma] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)
    incumbents: dict[tuple[str, str], str] = field(default_factory=dict)


def load_user_context(
    task: Task,
    dataset: Dataset,
    history: HistoryIndex,
    model_path: str | Path,
    task_adapter: str | Path | None = None,
    device: str = "auto",
    reference: dict[bytes, float] | None = None,
    gammas: dict[GammaInputs, Gamma] | None = None,
    summaries: dict[str, dict] | None = None,
    incumbents: dict[tuple[str, str], str] | None = None,
) -> UserContext:
    """The worker's context; ``reference`` and ``gammas``: π_ref's log-probs and γ from the job's
    passes; ``summaries``: the cached PAG summaries of the job's users; ``incumbents``: the
    current adapters its runs are compared with, by (user, method)."""
    loaded = starting_model(model_path, task_adapter, device)
    return UserContext(task, dataset, history, loaded, ReferenceLogps(reference), dict(gammas or {}), dict(summaries or {}), dict(incumbents or {}))
