"""How a pass's rows go through the model within a memory budget: checkpointed or not, and
how many at once.

With completion log-probs taken a chunk at a time (``logprobs.py``), what a training pass keeps
is the decoder's activations for the backward: per layer and token, about ten hidden-wide
tensors (norm inputs and outputs, q, k, v, attention output, residuals), four MLP-wide ones
(gate, up, their activation and product) and, where attention is not fused, two rows of
attention weights per head (scores and probabilities). On a CPU that is 2 MB a token for
SmolLM2-135M at 560-token rows (30 layers): one batch of 8 such rows kept 9 GB
(``bench/memory.py``).

A CPU pass whose activations would pass the budget is checkpointed (``MultiLora.checkpointed``):
it keeps each layer's input (one hidden-wide tensor per layer and token) and one layer's
activations at a time, recomputed in the backward: SmolLM2's 8 rows of 560 tokens then fit
at once, from 1.4 GiB a row. Its cost is one more forward of the pass, which is what cutting
the pass into micro-batches costs too (``trainer.backward_by_rows`` runs the rows once without
a graph first), so past the budget checkpointing is the cheaper of the two in memory at the
same compute; under it, neither is needed. Rows the checkpointed estimate still does not
hold go through the model ``micro_batch_rows`` at a time, with the whole pass's losses and
gradients. A CUDA pass stays whole and is not checkpointed: there ``pack_memory.py``
measures a slot's memory on the whole batch and packs users by it, and a GPU loses
throughput on small passes.
"""

from __future__ import annotations

import torch

from cbpo_orch.training.worker_memory import ACTIVATION_BUDGET


def layer_activation_bytes(config, width: int, dtype: torch.dtype) -> int:
    """Estimated bytes one decoder layer of ``config`` keeps for the backward per row of ``width`` tokens."""
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    per_token = 10 * hidden + 4 * intermediate + 2 * config.num_attention_heads * width
    return per_token * width * dtype.itemsize


def activation_bytes(config, width: int, dtype: torch.dtype, checkpointed: bool = False) -> int:
    """Estimated bytes a decoder of ``config`` keeps for the backward per row of ``width``
    tokens: every layer's activations, or, ``checkpointed``, every layer's input and one
    layer's activations (the one being recomputed)."""
    layer = layer_activation_bytes(config, width, dtype)
    if not checkpointed:
        return config.num_hidden_layers * layer
    return config.num_hidden_layers * config.hidden_size * width * dtype.itemsize + layer


def checkpointing_pays(model, rows: int, width: int, device, budget: int = ACTIVATION_BUDGET) -> bool:
    """Whether a training pass of ``rows`` rows of ``width`` tokens is checkpointed: off CUDA,
    when its whole activations pass ``budget`` and the model can checkpoint its layers."""
    if torch.device(device).type == "cuda" or not getattr(model, "supports_gradient_checkpointing", False):
        return False
    return rows * activation_bytes(model.config, width, model.dtype) > budget


def micro_batch_rows(model, rows: int, width: int, device, checkpointed: bool = False, budget: int = ACTIVATION_BUDGET) -> int:
    """Rows of ``width`` tokens per forward/backward: every row on CUDA, elsewhere as many as
    ``budget`` holds (``checkpointed`` or not), at least one, at most ``rows``."""
    if torch.device(device).type == "cuda":
        return rows
    per_row = activation_bytes(model.config, width, model.dtype, checkpointed)
    return max(1, min(rows, budget // per_row))
