"""Turning (x, y) pairs into token ids with completion-only masks (METHOD.md §2, §7).

A prompt x is rendered with the tokenizer's chat template when it has one (instruction
models) and as ``x + "\\n"`` otherwise (base models). The completion is y followed by
the end-of-sequence token. When a pair is too long, the *content* of x is shortened,
never the template around it nor the completion, so the model always sees a
well-formed prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def render_prompt(tokenizer, x: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": x}], add_generation_prompt=True, tokenize=False
        )
    return x + "\n"


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, x: str, budget: int) -> list[int]:
    """Token ids of the rendered prompt, at most ``budget`` long, shortening x's content."""
    ids = _ids(tokenizer, render_prompt(tokenizer, x))
    if len(ids) <= budget:
        return ids
    overhead = len(_ids(tokenizer, render_prompt(tokenizer, ""))) + 1
    content = _ids(tokenizer, x)[: max(budget - overhead, 1)]
    ids = _ids(tokenizer, render_prompt(tokenizer, tokenizer.decode(content)))
    return ids[-budget:]


@dataclass(frozen=True)
class EncodedPair:
    """One pair as ids; ``prompt_len`` tokens of prompt then the completion tokens."""

    input_ids: tuple[int, ...]
    prompt_len: int


def encode_pair(tokenizer, x: str, y: str, max_length: int) -> EncodedPair:
    completion = _ids(tokenizer, y)[: max_length // 2] + [tokenizer.eos_token_id]
    prompt = prompt_ids(tokenizer, x, max_length - len(completion))
    return EncodedPair(tuple(prompt + completion), len(prompt))


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


def completion_logps(model, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each row's completion tokens, and their counts.

    Prompt and padding positions are masked out (METHOD.md §7: sums, not means). Only
    the positions from the batch's earliest completion token on go through the LM head
    (``logits_to_keep``): prompts are most of each row, and vocabulary-wide logits are
    the largest tensors of a step.
    """
    first = max(int(batch.completion_mask.int().argmax(-1).min()), 1)
    keep = batch.input_ids.shape[1] - first + 1
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep)
    logits = out.logits[:, :-1].float()
    targets = batch.input_ids[:, first:]
    mask = batch.completion_mask[:, first:]
    token_logps = torch.gather(logits, 2, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * mask).sum(-1), mask.sum(-1)
