"""PAG's profile summary: the starting model describes a user from its history, once per
user, and the summary goes before each of the user's prompts (issue 29).

The instruction is fixed and reads as many of the user's items as the budget holds, the
newest kept (rendered as retrieval renders them, oldest first). The summary and its
instruction stay within the job's context (prompt + completion budgets), the summary within
a quarter of the prompt budget so that a query keeps room beside it. Generation is greedy
with the task's guard against loops, over every user of a pack at once.

A summary is written once per (user, starting model, data): one the driver found in the home's
cache (``storage/summary_cache.py``, keyed by the instruction, so by the very items it read) is
reused, not written again, and the run records whether it was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cbpo_orch.data.records import Example
from cbpo_orch.data.retrieval import render_items
from cbpo_orch.data.tasks import NO_REPEAT_NGRAM, Budgets, Decoding
from cbpo_orch.storage.summary_cache import summary_key
from cbpo_orch.training.generation import generate
from cbpo_orch.training.models import LoadedModel

SUMMARY_INSTRUCTION = (
    "Here are texts one user wrote, each after the request it answered:\n\n{items}\n\n"
    "In two or three sentences, describe how this user writes: the topics, the tone and the style."
)
SUMMARY_TOKENS = 96
SUMMARY_LABEL = "About this user: {summary}"


@dataclass(frozen=True)
class Summary:
    """A user's summary (empty where no item fits the budget), how many items it read, why its
    generation ended (None where nothing was generated), its cache key (``summary_key``; None
    where nothing was asked) and whether it came from the cache instead of a generation."""

    text: str
    n_items: int
    finish_reason: str | None
    key: str | None = None
    cached: bool = False

    def record(self) -> dict:
        """What the run records of it; the cache keeps the first three."""
        return {"summary": self.text, "summary_items": self.n_items, "summary_finish": self.finish_reason,
                "summary_key": self.key, "summary_cached": self.cached}


def summary_budgets(budgets: Budgets) -> Budgets:
    """The summary's budgets: at most ``SUMMARY_TOKENS`` new tokens, and a quarter of the
    job's prompt budget; its instruction takes the rest of the job's context."""
    new_tokens = min(SUMMARY_TOKENS, budgets.prompt_tokens // 4)
    return Budgets(budgets.context - new_tokens, new_tokens)


def summary_prompt(items: Sequence[Example], length: Callable[[str], int], budget: int) -> tuple[str, int]:
    """(the instruction over the user's newest ``items`` that fit ``budget`` tokens by
    ``length``, how many); ("", 0) where not even the newest fits."""
    fitting = ("", 0)
    for n in range(1, len(items) + 1):
        text = SUMMARY_INSTRUCTION.format(items=render_items(items[len(items) - n :]))
        if length(text) > budget:
            break
        fitting = (text, n)
    return fitting


def profile_summaries(
    loaded: LoadedModel, users_items: list[Sequence[Example]], budgets: Budgets, length: Callable[[str], int], batch_size: int, known: dict[str, dict]
) -> list[Summary]:
    """Each user's summary: from ``known`` (the cache's records, by key) where it holds the
    summary of the same instruction, else by ``loaded``'s model (the starting model), all
    those in one batched generation."""
    own = summary_budgets(budgets)
    prompts = [summary_prompt(items, length, own.prompt_tokens) for items in users_items]
    keys = [summary_key(text, own.new_tokens) if n else None for text, n in prompts]
    asked = [text for (text, n), key in zip(prompts, keys) if n and key not in known]
    written = iter(generate(loaded.model, loaded.tokenizer, asked, own, batch_size, loaded.device, decoding=Decoding(no_repeat_ngram=NO_REPEAT_NGRAM)) if asked else [])
    summaries = []
    for (_, n), key in zip(prompts, keys):
        if not n:
            summaries.append(Summary("", 0, None))
        elif key in known:
            summaries.append(Summary(known[key]["summary"], n, known[key]["summary_finish"], key, cached=True))
        else:
            completion = next(written)
            summaries.append(Summary(completion.text, n, completion.finish_reason, key))
    return summaries
