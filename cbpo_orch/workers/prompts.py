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
from dataclasses import dataclass, field

import numpy as np

from cbpo_orch.data.records import Example
from cbpo_orch.data.retrieval import Asked, bm25_scores, default_k, embedding_scores, fitted_prompt, retrieve, with_context
from cbpo_orch.data.tasks import Budgets
from cbpo_orch.method.config import TrainConfig
from cbpo_orch.method.methods import method_spec
from cbpo_orch.training.encoding import prompt_lengths
from cbpo_orch.workers.profile_summary import SUMMARY_LABEL, profile_summaries
from cbpo_orch.workers.user_context import UserContext


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


def prompt_kind(config: TrainConfig) -> str:
    """How ``config``'s method composes its prompts: its MethodSpec prompt kind, or retrieved items for an
    arm that trains with ``--retrieve k`` (``base`` stays the plain baseline)."""
    method = method_spec(config.method)
    return "retrieved" if method.trains and config.retrieve else method.prompt


def compose(context: UserContext, users: list[UserAsk], config: TrainConfig, budgets: Budgets) -> list[Composed]:
    """Every user's prompts, by its method's composer."""
    return COMPOSERS[prompt_kind(config)](context, users, config, budgets)


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
    items older than everything the user is asked (``Asked.before``)."""
    length = _length(context)
    seen = [user.items[: min((a.before for a in user.asked), default=0)] for user in users]
    summaries = profile_summaries(context.loaded, seen, budgets, length, config.eval_batch_size)
    composed = []
    for user, summary in zip(users, summaries):
        label = SUMMARY_LABEL.format(summary=summary.text) if summary.text else ""
        prompts = [_fitting_or_bare(with_context(label, a.prompt), a.prompt, length, budgets) for a in user.asked]
        record = {"summary": summary.text, "summary_items": summary.n_items, "summary_finish": summary.finish_reason}
        composed.append(Composed(prompts, record=record))
    return composed


def _fitting_or_bare(text: str, bare: str, length: Callable[[str], int], budgets: Budgets) -> str:
    return text if length(text) <= budgets.prompt_tokens else bare


def _length(context: UserContext) -> Callable[[str], int]:
    """A prompt's rendered length in the model's tokens."""
    return lambda text: prompt_lengths(context.loaded.tokenizer, [text])[0]


COMPOSERS: dict[str, Callable[..., list[Composed]]] = {"plain": _plain, "retrieved": _retrieved, "summary": _summarized}
RETRIEVERS: dict[str, Callable[..., list]] = {"embedding": _embedding_scores, "bm25": _bm25_scores}
