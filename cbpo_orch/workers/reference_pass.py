"""One shard of the job's π_ref pass: a plain function, run as a Ray task per shard by the driver."""

from __future__ import annotations

import torch

from cbpo_orch.data.tasks import Budgets
from cbpo_orch.storage.reference_cache import LEFT_OUT, Entry, pair_text_key
from cbpo_orch.training.encoding import encode_pair, within_budget
from cbpo_orch.training.reference_logps import ReferenceLogps
from cbpo_orch.training.task_adapter import starting_model


def reference_shard(
    pairs: list[tuple[str, str]],
    model: str,
    task_adapter: str | None,
    budgets: Budgets,
    batch_size: int,
    threads: int,
) -> dict[bytes, Entry]:
    """π_ref's summed completion log-probs of the ``(x, y)`` pairs under the job's starting
    model, encoded as the trainer encodes them: each pair's cache entry by its text key
    (its token key, as the trainer's memo keys it, and its value; :data:`LEFT_OUT` for a pair
    whose prompt is over the budget, which training leaves out)."""
    torch.set_num_threads(max(1, threads))
    loaded = starting_model(model, task_adapter)
    tokenizer = loaded.tokenizer
    fitting = within_budget(tokenizer, pairs, budgets.prompt_tokens)
    encoded = [encode_pair(tokenizer, x, y, budgets) for x, y in fitting]
    memo = ReferenceLogps()
    keys = memo.fill(loaded.model, encoded, tokenizer.pad_token_id, batch_size, loaded.device)
    entries = {pair_text_key(x, y, budgets.prompt_tokens, budgets.new_tokens): LEFT_OUT for x, y in pairs}
    for (x, y), key in zip(fitting, keys):
        entries[pair_text_key(x, y, budgets.prompt_tokens, budgets.new_tokens)] = (key, memo.values[key])
    return entries
