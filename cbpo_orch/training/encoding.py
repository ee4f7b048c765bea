"""Turning (x, y) pairs into token ids with completion-only masks (METHOD.md §2, §7).

A prompt x is rendered with the tokenizer's chat template when it has one (instruction
models) and as ``x + "\\n"`` otherwise (base models). Budgets (:class:`Budgets`) bound
both sides. A prompt is never cut: one over its budget raises :class:`BudgetError` (a
training item over budget is left out by :func:`within_budget` instead). A completion is
y followed by the end-of-sequence token; a y longer than its budget is cut to it *without*
the end-of-sequence token, so a cut target never teaches the model to stop early.
A batch's completion log-probs come from ``logprobs.py``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from cbpo_orch.data.tasks import Budgets
from cbpo_orch.method.config import ConfigError


class BudgetError(ConfigError):
    """A prompt that does not fit its token budget, or budgets that do not fit the model."""


def render_prompt(tokenizer, x: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": x}], add_generation_prompt=True, tokenize=False
        )
    return x + "\n"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, x: str, budget: int) -> list[int]:
    """Token ids of the rendered prompt; :class:`BudgetError` when they exceed ``budget``."""
    ids = _ids(tokenizer, render_prompt(tokenizer, x))
    if len(ids) > budget:
        raise BudgetError(
            f"a prompt of {len(ids)} tokens exceeds the prompt budget of {budget} "
            f"(raise --max-prompt-tokens): {x[:60]!r}…"
        )
    return ids


def prompt_lengths(tokenizer, prompts: list[str]) -> list[int]:
    """Token counts of the rendered prompts (one batched tokenizer call)."""
    if not prompts:
        return []
    rendered = [render_prompt(tokenizer, x) for x in prompts]
    return [len(ids) for ids in tokenizer(rendered, add_special_tokens=False)["input_ids"]]


def within_budget(tokenizer, pairs: list[tuple[str, str]], budget: int) -> list[tuple[str, str]]:
    """The pairs whose rendered prompt fits ``budget`` tokens (training leaves the others out)."""
    lengths = prompt_lengths(tokenizer, [x for x, _ in pairs])
    return [pair for pair, n in zip(pairs, lengths) if n <= budget]


def check_prompts(tokenizer, prompts: Iterable[tuple[str, str]], budgets: Budgets, model_context: int | None) -> None:
    """Fail with one clear line unless every ``(where, prompt)`` fits the prompt budget and
    the budgets fit the model's context (``model_context`` tokens, when known)."""
    if model_context is not None and budgets.context > model_context:
        raise BudgetError(
            f"prompt budget {budgets.prompt_tokens} + new-token budget {budgets.new_tokens} = {budgets.context} "
            f"tokens exceeds the model's context of {model_context}: lower --max-prompt-tokens or --max-new-tokens"
        )
    named = list(prompts)
    lengths = prompt_lengths(tokenizer, [x for _, x in named])
    over = [(n, where) for n, (where, _) in zip(lengths, named) if n > budgets.prompt_tokens]
    if over:
        longest, where = max(over)
        raise BudgetError(
            f"{len(over)} of {len(named)} query prompts exceed the prompt budget of {budgets.prompt_tokens} tokens "
            f"(longest: {longest} tokens, {where}); raise --max-prompt-tokens to at least {longest}"
        )


def completion_ids(tokenizer, y: str, budget: int) -> list[int]:
    """y's ids and the end-of-sequence token, or, when y does not fit, its first ``budget`` ids alone."""
    ids = _ids(tokenizer, y)
    return ids + [tokenizer.eos_token_id] if len(ids) < budget else ids[:budget]


@dataclass(frozen=True)
class EncodedPair:
    """One pair as ids; ``prompt_len`` tokens of prompt then the completion tokens."""

    input_ids: tuple[int, ...]
    prompt_len: int


def encode_pair(tokenizer, x: str, y: str, budgets: Budgets) -> EncodedPair:
    prompt = prompt_ids(tokenizer, x, budgets.prompt_tokens)
    return EncodedPair(tuple(prompt + completion_ids(tokenizer, y, budgets.new_tokens)), len(prompt))


@dataclass
class TokenBatch:
    """Right-padded ids, attention mask and a mask over the completion tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor

    def to(self, device: torch.device) -> "TokenBatch":
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device), self.completion_mask.to(device))


def collate(pairs: list[EncodedPair], pad_id: int) -> TokenBatch:
    width = max(len(p.input_ids) for p in pairs)
    ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(pairs), width), dtype=torch.long)
    completion = torch.zeros((len(pairs), width), dtype=torch.bool)
    for row, pair in enumerate(pairs):
        n = len(pair.input_ids)
        ids[row, :n] = torch.tensor(pair.input_ids)
        attention[row, :n] = 1
        completion[row, pair.prompt_len : n] = True
    return TokenBatch(ids, attention, completion)
