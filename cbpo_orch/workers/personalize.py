"""Personalize users with one method: hold out → select aux → estimate γ → train (several
users in the same passes; with selection, keeping the best epoch on the held-out items) →
answer the user's queries and evaluation items → score. In a checking update, the user's current
adapter (``UserContext.incumbents``) answers the same prompts and is scored on the same golds,
for promotion to compare the two.

A plain function over a loaded :class:`UserContext`: callable from the CLI, a test or
a Ray worker alike. It writes nothing; it returns the metrics and the adapter's files,
and the caller decides where they go (the orchestrator's driver is the only writer).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from cbpo_orch.data.records import Example
from cbpo_orch.data.retrieval import Asked
from cbpo_orch.data.tasks import Budgets
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.method.methods import method_spec
from cbpo_orch.training.encoding import BudgetError, encode_pair, within_budget
from cbpo_orch.training.evaluation import rouge
from cbpo_orch.training.generation import Completion, generate
from cbpo_orch.training.multi_lora import ADAPTER_WEIGHTS, MultiLora, attached_multi_lora
from cbpo_orch.training.pack_memory import pack_slots
from cbpo_orch.training.trainer import (
    StepCallback,
    TrainResult,
    UserTraining,
    adapter_files,
    encode_samples,
    held_out_logp,
    mismatched_pairs,
    slot_groups,
    train_and_hold,
)
from cbpo_orch.workers.gamma_pass import estimated_gamma
from cbpo_orch.workers.prompts import Composed, UserAsk, compose, prompted_items
from cbpo_orch.workers.user_context import UserContext
from cbpo_orch.workers.user_items import UserItems, gamma_inputs, user_items


@dataclass
class UserOutcome:
    user_id: str
    method: str
    metrics: dict
    adapter_files: dict[str, bytes] | None
    predictions: list[dict] = field(default_factory=list)
    incumbent_rouge1: float | None = None
    """The ROUGE-1 of the user's current adapter (``UserContext.incumbents``) on the prompts and
    golds ``metrics["rouge1"]`` is measured on; None where it has none or none has a gold."""

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


@dataclass
class _Prepared:
    """One user made ready to train: γ and the training work; ``drawn``: its items as
    ``user_items`` drew them (positives, held-out, aux and evaluation items, before any prompt
    is composed); ``items``: all of the user's items the method may see, oldest first;
    ``evaluation``: the evaluation items within budget; ``composed``: the prompts it is answered
    on, once composed."""

    user_id: str
    phases: dict[str, float]
    drawn: UserItems
    items: list[Example]
    evaluation: list
    gamma: float | None
    gamma_reason: str | None
    work: UserTraining | None = None
    held_pairs: list[tuple[str, str]] = field(default_factory=list)
    composed: Composed | None = None


def personalize_user(context: UserContext, user_id: str, config: TrainConfig, on_step: StepCallback | None = None) -> UserOutcome:
    """One user: :func:`personalize_users` with a one-user pack."""
    [outcome] = personalize_users(context, [user_id], config, on_step)
    return outcome


def personalize_users(
    context: UserContext, user_ids: list[str], config: TrainConfig, on_step: StepCallback | None = None
) -> list[UserOutcome]:
    """Personalize ``user_ids`` with one method, their adapters trained in the same passes
    (``train_adapters``: each user's result is the one it gets alone), as many at once as the
    device's memory holds (``pack_slots``; a slot whose user ends takes the next). Each user's
    aux, γ, generation and scores are its own; their queries are answered in shared batches
    too, each row by its own user's adapter. The train and generate phases' seconds are the
    shared ones; the reference phase (π_ref's pass over the user's items not seen before by
    this worker) is the user's own."""
    loaded, tokenizer = context.loaded, context.loaded.tokenizer
    budgets = context.task.budgets(config.max_prompt_tokens, config.max_new_tokens)
    prepared = [_prepare(context, user_id, config) for user_id in user_ids]
    if not method_spec(config.method).trains:
        answers = _answer(context, prepared, config, budgets)
        return [_outcome(context, user, config, outputs, None, None) for user, outputs in zip(prepared, answers)]

    for user in prepared:
        _add_work(context, user, budgets, config)
    works = [user.work for user in prepared]
    n_slots = pack_slots(loaded.model, config.lora, works, config.batch_size, loaded.device)
    with attached_multi_lora(loaded.model, config.lora, n_slots=n_slots) as multi:
        started = time.perf_counter()
        results, adapters = train_and_hold(multi, tokenizer, works, config, loaded.device, on_step, context.reference)
        train_seconds = round(time.perf_counter() - started - sum(r.reference_seconds for r in results), 3)
        outcomes = []
        for group in slot_groups(multi, adapters):
            members = [prepared[u] for u in group]
            answers = _answer(context, members, config, budgets, multi)
            kept = []  # each member's adapter files and selection, taken before its slot holds its current adapter
            for slot, (u, user) in enumerate(zip(group, members)):
                result = results[u]
                user.phases["reference"] = round(result.reference_seconds, 3)
                user.phases["train"] = train_seconds
                selection = _selection(user, result)
                kept.append((adapter_files(multi, slot, {"reference_state": result.reference_state, "losses": result.losses, **selection}), selection))
            incumbent_scores = _incumbent_scores(context, members, config, budgets, multi)
            for u, user, outputs, (files, selection), incumbent in zip(group, members, answers, kept, incumbent_scores):
                outcomes.append(_outcome(context, user, config, outputs, results[u], files, selection, incumbent))
    return outcomes


def _incumbent_scores(context: UserContext, members: list[_Prepared], config: TrainConfig, budgets: Budgets, multi: MultiLora) -> list[float | None]:
    """Each user's ROUGE-1 under its current adapter (``context.incumbents``), loaded into the
    user's slot of ``multi`` in place of its new one, on the prompts and golds its new adapter
    was scored on; None for a user without one. The seconds of that generation are those
    users' ``incumbent`` phase."""
    folders = [context.incumbents.get((user.user_id, config.method)) for user in members]
    if not any(folders):
        return [None] * len(members)
    for slot, folder in enumerate(folders):
        if folder is not None:
            multi.load_slot(slot, load_file(str(Path(folder) / ADAPTER_WEIGHTS)))
    shared: dict[str, float] = {}
    with _phase(shared, "incumbent"):
        answers = _generated(context, [user.composed.prompts if folder else [] for user, folder in zip(members, folders)], config, budgets, multi)
    scores = []
    for user, folder, outputs in zip(members, folders, answers):
        if folder is not None:
            user.phases.update(shared)
        scores.append(_scores(outputs, _asked(context, user))["rouge1"] if folder else None)
    return scores


def _answer(context: UserContext, prepared: list[_Prepared], config: TrainConfig, budgets: Budgets, multi: MultiLora | None = None) -> list[list[Completion]]:
    """Every user's queries and evaluation items answered in shared batches, each row by its
    user's slot of ``multi`` (without one: by the starting model), on the prompts its method
    composes (``prompts.py``), ended and guarded by the task's decoding; each user's prompts
    and generate phases are the shared ones'."""
    shared: dict[str, float] = {}
    with _phase(shared, "prompts"):
        composed = compose(context, [UserAsk(user.items, _asked(context, user)) for user in prepared], config, budgets)
    for user, own in zip(prepared, composed):
        user.composed = own
    with _phase(shared, "generate"):
        answers = _generated(context, [own.prompts for own in composed], config, budgets, multi)
    for user in prepared:
        user.phases.update(shared)
    return answers


def _generated(context: UserContext, prompts: list[list[str]], config: TrainConfig, budgets: Budgets, multi: MultiLora | None = None) -> list[list[Completion]]:
    """Each user's ``prompts`` answered in shared batches, user ``i``'s by slot ``i`` of ``multi``
    (without one: by the starting model), ended and guarded by the task's decoding."""
    loaded = context.loaded
    slots = [slot for slot, own in enumerate(prompts) for _ in own] if multi is not None else None
    flat = iter(generate(loaded.model, loaded.tokenizer, [p for own in prompts for p in own], budgets, config.eval_batch_size, loaded.device, slots, multi, context.task.decoding))
    return [[next(flat) for _ in own] for own in prompts]


def _prepare(context: UserContext, user_id: str, config: TrainConfig) -> _Prepared:
    """Hold out → select aux → estimate γ, for one user; its evaluation items whose prompt is
    over the budget are left out, as training items are."""
    phases: dict[str, float] = {}
    with _phase(phases, "aux"):
        items = user_items(context.dataset, context.history, user_id, config)
    seen = items.positives + items.held_out + items.evaluation  # every item of the user, oldest first
    with _phase(phases, "gamma"):
        gamma, gamma_reason = _gamma(context, items, config)
    budgets = context.task.budgets(config.max_prompt_tokens, config.max_new_tokens)
    fitting = set(_fitting(context.loaded.tokenizer, items.evaluation, budgets, user_id))
    evaluation = [e for e in items.evaluation if (e.x, e.y) in fitting]
    return _Prepared(user_id, phases, items, seen, evaluation, gamma, gamma_reason)


def _add_work(context: UserContext, user: _Prepared, budgets: Budgets, config: TrainConfig) -> None:
    """The user's training work: the items within budget, prompted as the method prompts
    (``prompts.prompted_items``), encoded; KTO's mismatched pairs; the held-out score."""
    loaded = context.loaded
    tokenizer = loaded.tokenizer
    prompted = prompted_items(context, user.drawn, config, budgets)
    positives, auxiliary, held_out = prompted.positives, prompted.auxiliary, prompted.held_out
    pos_pairs = _fitting(tokenizer, positives, budgets, user.user_id, required=True)
    aux_pairs = _fitting(tokenizer, auxiliary, budgets, user.user_id)
    held_pairs = _fitting(tokenizer, held_out, budgets, user.user_id)
    user.held_pairs = held_pairs
    user.work = UserTraining(
        samples=encode_samples(tokenizer, pos_pairs, True, budgets) + encode_samples(tokenizer, aux_pairs, False, budgets),
        gamma=user.gamma or 0.0,
        seed=config.seed,
        kl_pairs=mismatched_pairs(tokenizer, pos_pairs + aux_pairs, budgets) if method_spec(config.method).mismatched else None,
        validate=_held_out_score(loaded.model, tokenizer, held_pairs, budgets, config, loaded.device) if held_pairs else None,
    )


def _selection(user: _Prepared, result: TrainResult) -> dict:
    """What selection did for the user, and how many of its items were over the budget."""
    n_items = len(user.drawn.positives) + len(user.drawn.auxiliary) + len(user.drawn.held_out)
    return {
        "n_held_out": len(user.held_pairs),
        "selected_epoch": result.selected_epoch,
        "validation_logp": result.validation_scores,
        "n_over_budget": n_items - len(user.work.samples) - len(user.held_pairs),
    }


def _asked(context: UserContext, user: _Prepared) -> list[Asked]:
    """What the user is answered on: its queries (gold None where the split has none; every
    item of the user comes before them), then its evaluation items (their own text is the
    gold; the items before one are those older than it)."""
    position = {e.item_id: i for i, e in enumerate(user.items)}
    queries = [Asked(q.id, context.task.prompt(q), q.gold, len(user.items)) for q in context.dataset.user(user.user_id).queries]
    return queries + [Asked(e.item_id, e.x, e.y, position[e.item_id]) for e in user.evaluation]


def _outcome(
    context: UserContext,
    user: _Prepared,
    config: TrainConfig,
    outputs: list[Completion],
    result: TrainResult | None,
    files: dict[str, bytes] | None,
    selection: dict | None = None,
    incumbent_rouge1: float | None = None,
) -> UserOutcome:
    """Score the user's outputs and gather its metrics and predictions. The scores are the
    mean over every answered item with a gold (queries and evaluation items alike); none
    where no item has one. ``incumbent_rouge1``: its current adapter's, on the same items."""
    asked = _asked(context, user)
    with _phase(user.phases, "score"):
        scores = _scores(outputs, asked)
    evaluation = {
        "n_scored": sum(a.gold is not None for a in asked),
        "n_eval_items": len(user.evaluation),
        "hit_budget": sum(out.finish_reason == "length" for out in outputs),
        "steps": result.steps if result else 0,
    }
    metrics = {
        "user_id": user.user_id,
        "method": config.method,
        **scores,
        "gamma": user.gamma,
        "gamma_reason": user.gamma_reason,
        "n_pos": len(user.drawn.positives),
        "n_aux": len(user.drawn.auxiliary),
        "selection": selection or {},
        "evaluation": evaluation,
        "train_seconds": user.phases.get("train", 0.0),
        "seconds": round(sum(user.phases.values()), 3),
        "phase_seconds": user.phases,
        "losses": result.losses if result else [],
        "prompting": user.composed.record,
        "config": config.to_dict(),
    }
    n_queries = len(asked) - len(user.evaluation)
    carried = user.composed.carried or [[] for _ in asked]
    predictions = [
        {"id": a.id, "prediction": out.text, "gold": a.gold, "finish_reason": out.finish_reason, "eval_item": k >= n_queries,
         **({"context_items": ids} if user.composed.carried else {})}
        for k, (a, out, ids) in enumerate(zip(asked, outputs, carried))
    ]
    return UserOutcome(user.user_id, config.method, metrics, files, predictions, incumbent_rouge1)


def _scores(outputs: list[Completion], asked: list[Asked]) -> dict:
    """ROUGE-1 and ROUGE-L of an adapter's ``outputs`` against the golds of the items ``asked``
    (in the same order), over the items with a gold; None where none has one."""
    scored = [(out.text, a.gold) for out, a in zip(outputs, asked) if a.gold is not None]
    return rouge([text for text, _ in scored], [gold for _, gold in scored]) if scored else {"rouge1": None, "rougeL": None}


def _fitting(tokenizer, examples: list, budgets: Budgets, user_id: str, required: bool = False) -> list[tuple[str, str]]:
    """The examples' (x, y) pairs whose prompts fit the budget; ``required``: at least one must."""
    pairs = within_budget(tokenizer, [(e.x, e.y) for e in examples], budgets.prompt_tokens)
    if required and not pairs:
        raise BudgetError(
            f"user {user_id!r}: none of the {len(examples)} history items fits the prompt budget of "
            f"{budgets.prompt_tokens} tokens (raise --max-prompt-tokens)"
        )
    return pairs


def _held_out_score(model, tokenizer, pairs: list[tuple[str, str]], budgets: Budgets, config: TrainConfig, device):
    """The selection score: the held-out items' mean log-probability per completion token
    under ``model`` as it is when called (see ``selection.py`` for why not ROUGE)."""
    encoded = [encode_pair(tokenizer, x, y, budgets) for x, y in pairs]
    return lambda: held_out_logp(model, encoded, tokenizer.pad_token_id, config.eval_batch_size, device)


def _gamma(context: UserContext, items: UserItems, config: TrainConfig) -> tuple[float | None, str | None]:
    """γ for methods that read it: fixed by the config, from the job's γ pass, or estimated
    here on embeddings (METHOD.md §4) when the pass did not cover the run."""
    if not method_spec(config.method).uses_gamma:
        return None, None
    if config.gamma is not None:
        return config.gamma, "fixed by configuration"
    inputs = gamma_inputs(items, config)
    known = context.gammas.get(inputs)
    return known if known is not None else estimated_gamma(context.history, inputs)
