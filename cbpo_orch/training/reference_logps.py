"""π_ref's log-probs, computed once per pair for every user and method of a job.

The reference model is the starting model with every adapter off: the same for all users
and methods of a job (same base, same task adapter). So a history item's summed completion
log-prob under it is computed once, then reused as its owner's positive, as aux of other
users, and by every method that reads π_ref. The job's π_ref pass (``workers/reference_pass.py``)
fills one memo for the pairs its runs will train on; each worker starts from it and computes
only what it still lacks (KTO's mismatched pairs, a pair the pass did not foresee). Pairs are
keyed by their token ids, which include the budgets: a pair encoded differently is another pair.
"""

from __future__ import annotations

import hashlib
from array import array
import torch

from cbpo_orch.storage.reference_cache import KEY_BYTES
from cbpo_orch.training.encoding import EncodedPair
from cbpo_orch.training.logprobs import sequence_logps
from cbpo_orch.training.multi_lora import MultiLora


def _key(pair: EncodedPair) -> bytes:
    return hashlib.blake2b(array("q", (pair.prompt_len, *pair.input_ids)).tobytes(), digest_size=KEY_BYTES).digest()


class ReferenceLogps:
    """A memo of π_ref's summed completion log-probs over pairs, for one starting model;
    ``values`` (from the job's π_ref pass) are known from the start."""

    def __init__(self, values: dict[bytes, float] | None = None) -> None:
        self.values: dict[bytes, float] = dict(values or {})
        self.computed = 0  # pairs that went through the model

    def fill(self, model, pairs: list[EncodedPair], pad_id: int, batch_size: int, device) -> list[bytes]:
        """Compute the pairs not known yet under ``model`` as it is, shortest first (less
        padding per batch); returns the pairs' keys in order."""
        keys = [_key(pair) for pair in pairs]
        missing = {key: pair for key, pair in zip(keys, pairs) if key not in self.values}
        if missing:
            order = sorted(missing, key=lambda key: len(missing[key].input_ids))
            values = sequence_logps(model, [missing[key] for key in order], pad_id, batch_size, device)
            self.values.update(zip(order, values.tolist()))
            self.computed += len(order)
        return keys

    def __call__(self, multi: MultiLora, pairs: list[EncodedPair], pad_id: int, batch_size: int, device) -> torch.Tensor:
        """The log-probs of ``pairs`` in order, those not known yet computed with ``multi``'s
        adapters off."""
        with multi.disabled():
            keys = self.fill(multi.model, pairs, pad_id, batch_size, device)
        return torch.tensor([self.values[key] for key in keys], dtype=torch.float32, device=device)
