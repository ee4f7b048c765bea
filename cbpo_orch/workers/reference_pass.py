"""One shard of the job's π_ref pass: a plain function, run as a Ray task per shard by the driver."""

from __future__ import annotations

import torch

from cbpo_orch.data.tasks import Budgets
from cbpo_orch.training.encoding import encode_pair, within_budget
from cbpo_orch.training.reference_logps import ReferenceLogps
from cbpo_orch.training.task_adapter import starting_model


def reference_shard(
    pairs: list[tuple[str, str]],
    model: str,
    task_adapter: str | None,
    budgets: Budgets,
    batch_size: int,
    known: dict[bytes, float],
    threads: int,
) -> tuple[dict[bytes, float], int]:
    """π_ref's summed completion log-probs of the ``(x, y)`` pairs whose prompt fits the
    budget (the ones training keeps), under the job's starting model, encoded as the trainer
    encodes them and keyed as its memo keys them; those in ``known`` (earlier jobs') are not
    computed again. Returns the pairs' values and how many were computed."""
    torch.set_num_threads(max(1, threads))
    loaded = starting_model(model, task_adapter)
    tokenizer = loaded.tokenizer
    encoded = [encode_pair(tokenizer, x, y, budgets) for x, y in within_budget(tokenizer, pairs, budgets.prompt_tokens)]
    memo = ReferenceLogps(known)
    keys = memo.fill(loaded.model, encoded, tokenizer.pad_token_id, batch_size, loaded.device)
    return {key: memo.values[key] for key in keys}, memo.computed
