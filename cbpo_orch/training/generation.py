"""Greedy generation for a user's queries: from text prompts, or from their token ids, each
row by its own user's adapter slot where several users share the batches.

Every row ends by the end-of-sequence token, by the task's line rule (``Decoding``:
single-line tasks end at their first line break) or at its token budget, and never repeats
an n-gram of its own completion (``Decoding.no_repeat_ngram``). Evaluation and serving go
through :func:`generate_batch` with the same :class:`RowEnds`, so a served answer is the
recorded prediction.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from cbpo_orch.data.tasks import Budgets, Decoding
from cbpo_orch.training.encoding import prompt_ids
from cbpo_orch.training.multi_lora import MultiLora


@dataclass(frozen=True)
class Completion:
    """A row's answer: the text (special tokens dropped, stripped, cut by the line rule), why
    it ended (``stop``: end-of-sequence or line end, ``length``: its token budget) and token
    counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def banned_tokens(tokens: list[int], n: int) -> list[int]:
    """The tokens that, appended to ``tokens``, would repeat one of its n-grams."""
    if n < 2 or len(tokens) < n - 1:
        return []
    prefix = tokens[len(tokens) - n + 1 :]
    return [tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i : i + n - 1] == prefix]


class NoRepeatInCompletion(LogitsProcessor):
    """Forbids each row the tokens that would repeat an n-gram of its own completion (the
    tokens after ``prompt_width``). Unlike transformers' ``no_repeat_ngram_size``, the prompt
    does not count: a headline may copy the article's words."""

    def __init__(self, n: int, prompt_width: int):
        self.n, self.prompt_width = n, prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for row, tokens in enumerate(input_ids[:, self.prompt_width :].tolist()):
            banned = banned_tokens(tokens, self.n)
            if banned:
                scores[row, banned] = float("-inf")
        return scores


class RowEnds(StoppingCriteria):
    """Follows every row step by step: its tokens, and its end (end-of-sequence, the line
    rule, or its own ``budgets[row]`` tokens); tells ``generate`` which rows are done.
    ``on_token(row, reason)`` runs after each of a live row's steps (serving streams there)."""

    def __init__(self, tokenizer, decoding: Decoding, budgets: list[int], prompt_tokens: list[int]):
        self.tokenizer, self.decoding, self.budgets, self.prompt_tokens = tokenizer, decoding, budgets, prompt_tokens
        self.tokens: list[list[int]] = [[] for _ in budgets]
        self.reasons: list[str | None] = [None] * len(budgets)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        for i, token in enumerate(input_ids[:, -1].tolist()):
            if self.reasons[i] is not None:
                continue
            if token == self.tokenizer.eos_token_id:
                self.reasons[i] = "stop"
            else:
                self.tokens[i].append(token)
                if self.decoding.single_line and self.decoding.ended(self.raw_text(i)):
                    self.reasons[i] = "stop"
                elif len(self.tokens[i]) >= self.budgets[i]:
                    self.reasons[i] = "length"
            self.on_token(i, self.reasons[i])
        return torch.tensor([reason is not None for reason in self.reasons], device=input_ids.device)

    def on_token(self, row: int, reason: str | None) -> None:
        """Called after each step of a live row; ``reason`` is set on its last."""

    def raw_text(self, row: int) -> str:
        return self.tokenizer.decode(self.tokens[row], skip_special_tokens=True)

    def completion(self, row: int) -> Completion:
        """Row ``row``'s answer, once it has ended."""
        return Completion(self.decoding.finish(self.raw_text(row)), self.reasons[row], self.prompt_tokens[row], len(self.tokens[row]))


@torch.no_grad()
def generate_batch(
    model,
    rows: list[list[int]],
    max_new_tokens: int,
    pad_id: int,
    eos_id: int | None,
    device,
    slots: torch.Tensor | None = None,
    multi: MultiLora | None = None,
    ends: StoppingCriteria | None = None,
    no_repeat_ngram: int = 0,
    processors: list[LogitsProcessor] = (),
) -> torch.Tensor:
    """One greedy ``generate`` over the prompts' token ids ``rows``, left-padded, each row
    routed to its slot of ``multi`` (with ``slots``); returns the generated ids [rows, steps]
    (pads after a row's end)."""
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention[row, width - len(ids) :] = 1
    guard = [NoRepeatInCompletion(no_repeat_ngram, width)] if no_repeat_ngram else []
    routing = nullcontext() if multi is None else multi.routed(slots)
    with routing:
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
            stopping_criteria=StoppingCriteriaList([ends] if ends is not None else []),
            logits_processor=LogitsProcessorList([*guard, *processors]),
        )
    return generated[:, width:]


def _check_slots(slots: list[int] | None, multi: MultiLora | None, n_prompts: int) -> None:
    if (slots is None) != (multi is None) or (slots is not None and len(slots) != n_prompts):
        raise ValueError("slots (one per prompt) and the multi-LoRA holding them come together")


def generate(
    model,
    tokenizer,
    prompts: list[str],
    budgets: Budgets,
    batch_size: int,
    device,
    slots: list[int] | None = None,
    multi: MultiLora | None = None,
    decoding: Decoding = Decoding(),
) -> list[Completion]:
    """Greedy completions of ``prompts`` of at most ``budgets.new_tokens`` tokens, ended and
    guarded by ``decoding``; a prompt over its budget raises ``BudgetError``. With ``slots``
    (one per prompt) and the :class:`MultiLora` that holds them, each prompt is answered by
    its own slot's adapter and prompts of several users share the batches (each row's output
    is the one it gets alone: the rows of a batch only share the base)."""
    _check_slots(slots, multi, len(prompts))
    encoded = [prompt_ids(tokenizer, x, budgets.prompt_tokens) for x in prompts]
    was_training = model.training
    model.eval()
    completions: list[Completion] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        ends = RowEnds(tokenizer, decoding, [budgets.new_tokens] * len(batch), [len(ids) for ids in batch])
        routed = None if slots is None else torch.tensor(slots[start : start + batch_size], device=device)
        generate_batch(model, batch, budgets.new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id, device, routed, multi, ends, decoding.no_repeat_ngram)
        completions += [ends.completion(row) for row in range(len(batch))]
    model.train(was_training)
    return completions


@torch.no_grad()
def greedy_ids(
    model,
    encoded: list[list[int]],
    new_tokens: int,
    pad_id: int,
    eos_id: int | None,
    batch_size: int,
    device,
    slots: list[int] | None = None,
    multi: MultiLora | None = None,
) -> list[torch.Tensor]:
    """Greedy continuations (token ids, pads after an early end included) of the prompts'
    token ids ``encoded``, in batches of ``batch_size`` (the throughput bench's decode, no
    tokenizer needed); ``slots`` and ``multi`` as in :func:`generate`."""
    _check_slots(slots, multi, len(encoded))
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor] = []
    for start in range(0, len(encoded), batch_size):
        routed = None if slots is None else torch.tensor(slots[start : start + batch_size], device=device)
        outputs.extend(generate_batch(model, encoded[start : start + batch_size], new_tokens, pad_id, eos_id, device, routed, multi))
    model.train(was_training)
    return outputs
