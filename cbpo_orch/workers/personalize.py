"""Personalize one user with one method: select aux → estimate γ → train → generate → score.

A plain function over a loaded :class:`UserContext`: callable from the CLI, a test or
a Ray worker alike. It writes nothing; it returns the metrics and the adapter's files,
and the caller decides where they go (the orchestrator's driver is the only writer).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from cbpo_orch.method.config import TrainConfig
from cbpo_orch.method.data import Dataset
from cbpo_orch.method.evaluation import generate, rouge
from cbpo_orch.method.history import HistoryIndex
from cbpo_orch.method.methods import method_spec
from cbpo_orch.method.models import LoadedModel
from cbpo_orch.method.prior import PriorConfig, estimate_gamma
from cbpo_orch.method.tasks import Task
from cbpo_orch.method.trainer import StepCallback, adapter_files, attached_adapter, encode_samples, mismatched_pairs, train_adapter

CBPO_METHODS = ("cbpo", "cbpo-raw", "cbpo-nnpu")


@dataclass
class UserContext:
    """What every user of a job shares, loaded once per worker process."""

    task: Task
    dataset: Dataset
    history: HistoryIndex
    loaded: LoadedModel


@dataclass
class UserOutcome:
    user_id: str
    method: str
    metrics: dict
    adapter_files: dict[str, bytes] | None
    predictions: list[dict] = field(default_factory=list)

    def artifact_files(self) -> dict[str, bytes]:
        """What is saved for this run: the adapter's files (none for ``base``) and
        ``predictions.jsonl``, one query's prediction and gold per line."""
        lines = "".join(json.dumps(p) + "\n" for p in self.predictions)
        return {**(self.adapter_files or {}), "predictions.jsonl": lines.encode()}


@contextmanager
def _phase(phases: dict[str, float], name: str):
    started = time.perf_counter()
    yield
    phases[name] = round(time.perf_counter() - started, 3)


def personalize_user(context: UserContext, user_id: str, config: TrainConfig, on_step: StepCallback | None = None) -> UserOutcome:
    spec = method_spec(config.method)
    loaded, tokenizer = context.loaded, context.loaded.tokenizer
    user = context.dataset.user(user_id)
    phases: dict[str, float] = {}

    with _phase(phases, "aux"):
        positives = context.dataset.examples(user_id, config.max_profile)
        own_rows = context.history.rows(positives)
        n_aux = max(1, round(config.aux_ratio * len(positives)))
        aux_rows = context.history.auxiliary(user_id, own_rows, n_aux, config.aux_strategy, config.seed)
        auxiliary = [context.history.examples[row] for row in aux_rows] if spec.uses_aux else []

    with _phase(phases, "gamma"):
        gamma, gamma_reason = _gamma(context.history, own_rows, aux_rows, config)

    losses: list[float] = []
    files = None
    prompts = [context.task.prompt(q) for q in user.queries]
    max_new = config.max_new_tokens or context.task.max_new_tokens
    if spec.trains:
        with attached_adapter(loaded.model, config.lora, config.seed) as peft_model:
            with _phase(phases, "train"):
                pos_pairs = [(e.x, e.y) for e in positives]
                aux_pairs = [(e.x, e.y) for e in auxiliary]
                samples = encode_samples(tokenizer, pos_pairs, True, config.max_length) + encode_samples(
                    tokenizer, aux_pairs, False, config.max_length
                )
                kl_pairs = mismatched_pairs(tokenizer, pos_pairs + aux_pairs, config.max_length) if config.method == "kto" else None
                gammas = torch.tensor([gamma or 0.0], device=loaded.device)
                result = train_adapter(peft_model, tokenizer, samples, gammas, config, loaded.device, kl_pairs, on_step)
                losses = result.losses
            with _phase(phases, "generate"):
                outputs = generate(peft_model, tokenizer, prompts, max_new, config.max_length, config.eval_batch_size, loaded.device)
            files = adapter_files(peft_model, {"reference_state": result.reference_state, "losses": losses})
    else:
        with _phase(phases, "generate"):
            outputs = generate(loaded.model, tokenizer, prompts, max_new, config.max_length, config.eval_batch_size, loaded.device)

    with _phase(phases, "score"):
        golds = [q.gold for q in user.queries]
        scores = rouge(outputs, golds) if all(g is not None for g in golds) else {"rouge1": None, "rougeL": None}

    metrics = {
        "user_id": user_id,
        "method": config.method,
        **scores,
        "gamma": gamma,
        "gamma_reason": gamma_reason,
        "n_pos": len(positives),
        "n_aux": len(auxiliary),
        "train_seconds": phases.get("train", 0.0),
        "seconds": round(sum(phases.values()), 3),
        "phase_seconds": phases,
        "losses": losses,
        "config": config.to_dict(),
    }
    predictions = [{"id": q.id, "prediction": out, "gold": q.gold} for q, out in zip(user.queries, outputs)]
    return UserOutcome(user_id, config.method, metrics, files, predictions)


def _gamma(history: HistoryIndex, own_rows: list[int], aux_rows: list[int], config: TrainConfig) -> tuple[float | None, str | None]:
    """γ for C-BPO methods: fixed by the config, or estimated on embeddings (METHOD.md §4)."""
    if config.method not in CBPO_METHODS:
        return None, None
    if config.gamma is not None:
        return config.gamma, "fixed by configuration"
    prior = PriorConfig(
        estimator=config.gamma_estimator,
        gamma_max=config.gamma_max,
        fallback_gamma=config.fallback_gamma,
        seed=config.seed,
    )
    estimate = estimate_gamma(history.embeddings[own_rows], history.embeddings[aux_rows], prior)
    return estimate.gamma, estimate.reason

