"""How many of a pass's rows go through the model at once: as many as a memory budget holds.

With completion log-probs taken a chunk at a time (``logprobs.py``), what a training pass keeps
is the decoder's activations for the backward: per layer and token, about ten hidden-wide
tensors (norm inputs and outputs, q, k, v, attention output, residuals), four MLP-wide ones
(gate, up, their activation and product) and, where attention is not fused, two rows of
attention weights per head (scores and probabilities). On a CPU that is 2 MB a token for
SmolLM2-135M at 560-token rows (30 layers): one batch of 8 such rows kept 9 GB
(``bench/memory.py``). A CPU pass therefore goes through the model ``micro_batch_rows`` rows
at a time, with the whole pass's losses and gradients (``trainer.backward_by_rows``). A CUDA
pass keeps its rows together: there ``pack_memory.py`` measures a slot's memory on the whole
batch and packs users by it, and a GPU loses throughput on small passes.
"""

from __future__ import annotations

import torch

ACTIVATION_BUDGET = 2**30
"""Estimated activation bytes one CPU forward/backward may keep (1 GiB)."""


def activation_bytes(config, width: int, dtype: torch.dtype) -> int:
    """Estimated bytes a decoder of ``config`` keeps for the backward per row of ``width`` tokens."""
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 10 * hidden + 4 * intermediate + 2 * config.num_attention_heads * width
    return config.num_hidden_layers * per_token * width * dtype.itemsize


def micro_batch_rows(model, rows: int, width: int, device, budget: int = ACTIVATION_BUDGET) -> int:
    """Rows of ``width`` tokens per forward/backward: every row on CUDA, elsewhere as many as
    ``budget`` holds, at least one, at most ``rows``."""
    if torch.device(device).type == "cuda":
        return rows
    per_row = activation_bytes(model.config, width, model.dtype)
    return max(1, min(rows, budget // per_row))
