"""Greedy generation for a user's queries: from text prompts, or from their token ids, each
row by its own user's adapter slot where several users share the batches."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from cbpo_orch.data.tasks import Budgets
from cbpo_orch.training.encoding import prompt_ids
from cbpo_orch.training.multi_lora import MultiLora


def generate(
    model, tokenizer, prompts: list[str], budgets: Budgets, batch_size: int, device, slots: list[int] | None = None, multi: MultiLora | None = None
) -> list[str]:
    """Greedy completions of ``prompts`` of at most ``budgets.new_tokens`` tokens, special
    tokens stripped; a prompt over its budget raises ``BudgetError``. ``slots`` and ``multi``:
    as in :func:`greedy_ids`."""
    encoded = [prompt_ids(tokenizer, x, budgets.prompt_tokens) for x in prompts]
    completions = greedy_ids(model, encoded, budgets.new_tokens, tokenizer.pad_token_id, tokenizer.eos_token_id, batch_size, device, slots, multi)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in completions]


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
    token ids ``encoded``, in left-padded batches of ``batch_size``.

    With ``slots`` (one per prompt) and the :class:`MultiLora` that holds them, each prompt is
    answered by its own slot's adapter and prompts of several users share the batches (each
    row's output is the one it gets alone: the rows of a batch only share the base)."""
    if (slots is None) != (multi is None) or (slots is not None and len(slots) != len(encoded)):
        raise ValueError("slots (one per prompt) and the multi-LoRA holding them come together")
    was_training = model.training
    model.eval()
    outputs: list[torch.Tensor] = []
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start : start + batch_size]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        routing = nullcontext() if multi is None else multi.routed(torch.tensor(slots[start : start + batch_size], device=device))
        with routing:
            generated = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention.to(device),
                max_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
            )
        outputs.extend(generated[:, width:])
    model.train(was_training)
    return outputs
