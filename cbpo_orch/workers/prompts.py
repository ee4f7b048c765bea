"""The prompts a user is answered on, as its method composes them (``MethodSpec.prompt``):
``plain``; ``retrieved``, after the user's k most similar earlier items (RAG, and a trained arm
with ``--retrieve k``, in training as in evaluation); ``summary``, after the starting model's summary of the user (PAG).

One composer per kind, chosen by name (``COMPOSERS``), each over every user of a pack at once
(the asked prompts of a pack are embedded in one call, its summaries written in one batched
generation). Each returns the user's prompts, the ids of the items each prompt carries, and
what the run records about them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from cbpo_orch.data.records import Example
from cbpo_orch.data.retrieval import Asked, bm25_scores, default_k, embedding_scores, fitted_prompt, retrieve, with_context
from cbpo_orch.data.tasks import Budgets
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.training.encoding import prompt_lengths
from cbpo_orch.workers.profile_summary import SUMMARY_LABEL, profile_summaries
from cbpo_orch.workers.user_context import UserContext
from cbpo_orch.workers.user_items import UserItems, prompt_kind


@dataclass(frozen=True)
class UserAsk:
    """A user's items its method may see (oldest first: the candidates of every ``Asked``) and
    what it is asked."""

    items: list[Example]
    asked: list[Asked]


@dataclass(frozen=True)
class Composed:
    """A user's prompts, one per ``Asked``; ``carried``: the ids of the items each prompt
    carries (retrieval only); ``record``: what the run records (empty for plain prompts)."""

    prompts: list[str]
    carried: list[list[str]] = field(default_factory=list)
    record: dict = field(default_factory=dict)


def compose(context: UserContext, users: list[UserAsk], config: TrainConfig, budgets: Budgets) -> list[Composed]:
    """Every user's prompts, by its method's composer."""
    return COMPOSERS[prompt_kind(config)](context, users, config, budgets)


def prompted_items(context: UserContext, items: UserItems, config: TrainConfig, budgets: Budgets) -> UserItems:
    """``items`` with the prompts of the positives, held-out and aux items as ``config``'s method
    composes them: with ``--retrieve``, after the user's items retrieved for each (an own item's
    from the items older than it, an aux item's from every item the user trains on), as its
    queries and evaluation items are. The worker trains on them, and the driver's π_ref pass
    plans its pairs by them."""
    own = items.positives + items.held_out
    asked = [Asked(e.item_id, e.x, e.y, before) for before, e in enumerate(own)]
    asked += [Asked(e.item_id, e.x, e.y, len(own)) for e in items.auxiliary]
    [composed] = compose(context, [UserAsk(own + items.evaluation, asked)], config, budgets)
    prompted = [replace(e, x=x) for e, x in zip(own + items.auxiliary, composed.prompts)]
    n = len(items.positives)
    return replace(items, positives=prompted[:n], held_out=prompted[n : len(own)], auxiliary=prompted[len(own) :])


def served_prompt(context: UserContext, user_id: str, prompt: str, config: TrainConfig, budgets: Budgets) -> str:
    """A served request's prompt for ``user_id``, composed as the user's queries were in
    evaluation (every item of the user comes before it), so that it is answered alike."""
    items = context.dataset.examples(user_id, config.max_profile)
    [composed] = compose(context, [UserAsk(items, [Asked("request", prompt, None, len(items))])], config, budgets)
    return composed.prompts[0]


def _plain(context: UserContext, users: list[UserAsk], config: TrainConfig, budgets: Budgets) -> list[Composed]:
    return [Composed([a.prompt for a in user.asked]) for user in users]


def _retrieved(context: UserContext, users: list[UserAsk], config: TrainConfig, budgets: Budgets) -> list[Composed]:
    """Each prompt after its k retrieved items that fit the budget (``retrieval.py``)."""
    k = config.retrieve or default_k(context.task)
    length = _length(context)
    scores = RETRIEVERS[config.retriever](context, users)
    composed = []
    for user, user_scores in zip(users, scores):
        prompts, carried = [], []
        for asked, row in zip(user.asked, user_scores):
            chosen = retrieve(user.items, row, asked, k)
            text, n = fitted_prompt(chosen, asked.prompt, length, budgets.prompt_tokens)
            prompts.append(text)
            carried.append([item.item_id for item in chosen[:n]])
        composed.append(Composed(prompts, carried, {"retrieve": k, "retriever": config.retriever}))
    return composed


def _embedding_scores(context: UserContext, users: list[UserAsk]) -> list[np.ndarray]:
    """Each user's [asked, items] similarities: the asked prompts embedded by the job's
    embedder (loaded once per worker process) against the items' rows of the history index."""
    import torch

    from cbpo_orch.workers.embedding import embed_shard

    history = context.history
    texts = [a.prompt for user in users for a in user.asked]
    vectors = iter(embed_shard(texts, history.embedder, torch.get_num_threads()) if texts else [])
    return [embedding_scores(history.embeddings[history.rows(user.items)], np.array([next(vectors) for _ in user.asked])) for user in users]


def _bm25_scores(context: UserContext, users: list[UserAsk]) -> list[list[np.ndarray]]:
    """Each asked prompt's BM25 scores of its candidates (``retrieval.bm25_scores``)."""
    return [[bm25_scores(user.items, asked) for asked in user.asked] for user in users]


def _summarized(context: UserContext, users: list[UserAsk], config: TrainConfig, budgets: Budgets) -> list[Composed]:
    """Each prompt after the user's summary where both fit the budget. The summary reads only
    items older than everything the user is asked (``Asked.before``); one the job found in the
    home's cache (``context.summaries``) is not written again."""
    length = _length(context)
    seen = [user.items[: min((a.before for a in user.asked), default=0)] for user in users]
    summaries = profile_summaries(context.loaded, seen, budgets, length, config.eval_batch_size, context.summaries)
    composed = []
    for user, summary in zip(users, summaries):
        label = SUMMARY_LABEL.format(summary=summary.text) if summary.text else ""
        prompts = [_fitting_or_bare(with_context(label, a.prompt), a.prompt, length, budgets) for a in user.asked]
        composed.append(Composed(prompts, record=summary.record()))
    return composed


def _fitting_or_bare(text: str, bare: str, length: Callable[[str], int], budgets: Budgets) -> str:
    return text if length(text) <= budgets.prompt_tokens else bare


def _length(context: UserContext) -> Callable[[str], int]:
    """A prompt's rendered length in the model's tokens."""
    return lambda text: prompt_lengths(context.loaded.tokenizer, [text])[0]


COMPOSERS: dict[str, Callable[..., list[Composed]]] = {"plain": _plain, "retrieved": _retrieved, "summary": _summarized}
RETRIEVERS: dict[str, Callable[..., list]] = {"embedding": _embedding_scores, "bm25": _bm25_scores}
