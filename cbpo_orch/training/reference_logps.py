"""π_ref's log-probs, computed once per pair for every user and method a worker trains.

The reference model is the starting model with every adapter off: the same for all users
and methods of a job (same base, same task adapter). So a history item's summed completion
log-prob under it is computed once, then reused as its owner's positive, as aux of other
users, and by every method that reads π_ref. Pairs are keyed by their token ids, which
include the budgets: a pair encoded differently is another pair.
"""

from __future__ import annotations

import hashlib
from array import array

import torch

from cbpo_orch.training.encoding import EncodedPair, sequence_logps
from cbpo_orch.training.multi_lora import MultiLora


def _key(pair: EncodedPair) -> bytes:
    return hashlib.blake2b(array("q", (pair.prompt_len, *pair.input_ids)).tobytes(), digest_size=16).digest()


class ReferenceLogps:
    """A memo of π_ref's summed completion log-probs over pairs, for one starting model."""

    def __init__(self) -> None:
        self._values: dict[bytes, float] = {}
        self.computed = 0  # pairs that went through the model

    def __call__(self, multi: MultiLora, pairs: list[EncodedPair], pad_id: int, batch_size: int, device) -> torch.Tensor:
        """The log-probs of ``pairs`` in order; the pairs not seen before go through the
        model with the adapters off, shortest first (less padding per batch)."""
        keys = [_key(pair) for pair in pairs]
        missing = {key: pair for key, pair in zip(keys, pairs) if key not in self._values}
        if missing:
            order = sorted(missing, key=lambda key: len(missing[key].input_ids))
            with multi.disabled():
                values = sequence_logps(multi.model, [missing[key] for key in order], pad_id, batch_size, device)
            self._values.update(zip(order, values.tolist()))
            self.computed += len(order)
        return torch.tensor([self._values[key] for key in keys], dtype=torch.float32, device=device)
