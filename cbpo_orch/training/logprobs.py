"""Completion log-probs without vocabulary-wide tensors: the one path for training, π_ref
and held-out scoring (METHOD.md §7: summed log-probs of completion tokens).

A causal LM's forward returns logits for every kept position: [batch, sequence, vocabulary]
floats, then their log-softmax and, in training, its gradient. At 8 rows of 2,048 tokens and
SmolLM2's 49,152 words that is 3.2 GB a copy in fp32, for the few completion positions a
loss reads. Here the model's decoder body gives the hidden states; only the positions that
predict a completion token are gathered, and they go through the LM head ``CHUNK_BYTES`` of
logits at a time (logsumexp, the target's logit). In training each chunk runs under
``torch.utils.checkpoint``: its logits are recomputed in the backward instead of kept, so a
step holds one chunk's logits and their gradient, whatever the batch and vocabulary.

The head's matmul runs in the model's dtype and its logits are then cast to fp32, as the
full path does, so the numbers are those of ``model(...).logits.float()`` (tests/test_logprobs.py).

Liger-Kernel's fused linear cross-entropy does the same on a GPU, but it is Triton (no CPU
path, and this project trains on CPUs) and installs Triton beside torch; the chunked function
here is a few lines and serves both devices.

A model whose logits are more than a linear map of the last hidden state (Gemma-2's
soft-capping, Cohere's logit scale, Granite's divisor …) is only known to be plain when its
family is (``PLAIN_HEAD_FAMILIES``); any other model takes the full-logits path.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from cbpo_orch.training.encoding import EncodedPair, TokenBatch, collate

CHUNK_BYTES = 2**27
"""fp32 logits per chunk (128 MiB): 682 positions of SmolLM2's vocabulary, 220 of Qwen2's."""

PLAIN_HEAD_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})
"""Model types whose causal-LM forward is ``lm_head(decoder(...).last_hidden_state)`` and
nothing more (read off transformers' modeling files; each is checked in tests/test_logprobs.py)."""


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The decoder body and the linear LM head of a causal LM whose logits are exactly
    ``head(body(...).last_hidden_state)``; None when that is not known (the caller takes
    the full-logits path). A peft LoRA model is looked through: its layers live in the
    wrapped model, and disabling them there (π_ref) holds for the body too."""
    if hasattr(model, "get_base_model"):
        if model.active_peft_config.is_prompt_learning:
            return None
        model = model.get_base_model()
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if getattr(config, "model_type", None) not in PLAIN_HEAD_FAMILIES or type(head) is not nn.Linear:
        return None
    return model.base_model, head


def chunk_positions(vocab: int) -> int:
    """Positions per chunk: as many as ``CHUNK_BYTES`` of fp32 logits hold, at least one."""
    return max(1, CHUNK_BYTES // (4 * vocab))


def target_logps(hidden: Tensor, head: nn.Linear, targets: Tensor) -> Tensor:
    """log p(``targets[i]`` | ``hidden[i]``) in fp32 for hidden states [N, H] and targets [N],
    ``chunk_positions`` at a time; with a graph, each chunk's logits are recomputed in the
    backward rather than kept."""
    size = chunk_positions(head.out_features)
    keep_graph = torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad)
    pieces = []
    for start in range(0, hidden.shape[0], size):
        args = (hidden[start : start + size], head.weight, head.bias, targets[start : start + size])
        pieces.append(checkpoint(_chunk_logps, *args, use_reentrant=False, preserve_rng_state=False) if keep_graph else _chunk_logps(*args))
    return torch.cat(pieces) if pieces else hidden.new_zeros(0, dtype=torch.float32)


def _chunk_logps(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def completion_logps(model: nn.Module, batch: TokenBatch) -> tuple[Tensor, Tensor]:
    """Summed log-probabilities of each row's completion tokens [B] (fp32), and their counts.

    Prompt and padding positions are masked out (METHOD.md §7: sums, not means); a token at
    position 0 has nothing to be predicted from and is not counted."""
    mask = batch.completion_mask[:, 1:]
    split = split_head(model)
    if split is None:
        return _full_logits_logps(model, batch), mask.sum(-1)
    body, head = split
    hidden = body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    logps = target_logps(hidden[:, :-1][mask], head, batch.input_ids[:, 1:][mask])
    return torch.zeros(mask.shape, dtype=logps.dtype, device=logps.device).masked_scatter(mask, logps).sum(-1), mask.sum(-1)


def _full_logits_logps(model: nn.Module, batch: TokenBatch) -> Tensor:
    """The summed completion log-probs from the model's own logits, for a head that is not
    known to be plain: only the positions from the batch's earliest completion token on go
    through it (``logits_to_keep``), but those at full vocabulary width."""
    first = max(int(batch.completion_mask.int().argmax(-1).min()), 1)
    keep = batch.input_ids.shape[1] - first + 1
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep, use_cache=False)
    logits = out.logits[:, :-1].float()
    targets, mask = batch.input_ids[:, first:], batch.completion_mask[:, first:]
    token_logps = logits.gather(2, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return (token_logps * mask).sum(-1)


@torch.no_grad()
def sequence_logps(model, pairs: list[EncodedPair], pad_id: int, batch_size: int, device) -> torch.Tensor:
    """Summed completion log-probs of ``pairs`` under ``model`` in eval mode."""
    was_training = model.training
    model.eval()
    out = [
        completion_logps(model, collate(pairs[i : i + batch_size], pad_id).to(device))[0].float()
        for i in range(0, len(pairs), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, device=device)
