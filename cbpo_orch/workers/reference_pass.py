"""One shard of the job's π_ref pass: a plain function, run as a Ray task per shard by the driver."""

from __future__ import annotations

import torch

from cbpo_orch.data.tasks import Budgets
from cbpo_orch.training.encoding import encode_pair, within_budget
from cbpo_orch.training.reference_logps import ReferenceLogps
from cbpo_orch.training.task_adapter import starting_model


def reference_shard(
    pairs: list[tuple[str, str]], model: str, task_adapter: str | None, budgets: Budgets, batch_size: int, threads: int
) -> dict[bytes, float]:
    """π_ref's summed completion log-probs of the ``(x, y)`` pairs whose prompt fits the
    budget (the ones training keeps), under the job's starting model, encoded as the trainer
    encodes them and keyed as its memo keys them."""
    torch.set_num_threads(max(1, threads))
    loaded = starting_model(model, task_adapter)
    tokenizer = loaded.tokenizer
    encoded = [encode_pair(tokenizer, x, y, budgets) for x, y in within_budget(tokenizer, pairs, budgets.prompt_tokens)]
    memo = ReferenceLogps()
    memo.fill(loaded.model, encoded, tokenizer.pad_token_id, batch_size, loaded.device)
    return memo.values
