"""How many users' adapters one device trains at once: as many as its free memory holds.

A training step of a pack is one forward/backward over ``batch_size`` rows per user, every
row padded to the pack's longest sample, so each slot adds the same activations. On a CUDA
device the cost of one slot is measured, not guessed: one forward/backward of a one-slot
adapter on that many rows of that length, its peak memory above what was allocated before,
plus the slot's adapter weights, gradient and AdamW moments. The slots are then what
``HEADROOM`` of the free memory holds. Other devices (a CPU has no such limit worth sizing
against, and gains nothing from packing) give every user of the pack a slot.
"""

from __future__ import annotations

import torch

from cbpo_orch.method.config import LoraSettings
from cbpo_orch.training.encoding import EncodedPair, collate
from cbpo_orch.training.logprobs import completion_logps
from cbpo_orch.training.multi_lora import attached_multi_lora
from cbpo_orch.training.trainer import UserTraining

HEADROOM = 0.8
"""The share of the free device memory packs may fill: the rest covers what the probe does
not see (KTO's no-grad pass, the allocator's fragmentation, generation's KV cache)."""

ADAPTER_COPIES = 4
"""Per slot, besides activations: its weights, their gradient and AdamW's two moments."""


def slots_for(free_bytes: int, slot_bytes: int, users: int, headroom: float = HEADROOM) -> int:
    """The users that train at once: as many slots of ``slot_bytes`` as ``headroom`` of
    ``free_bytes`` holds, at least 1 (a user too large for the device fails as it would
    alone), at most ``users``."""
    if slot_bytes <= 0:
        return users
    return max(1, min(users, int(free_bytes * headroom) // slot_bytes))


def slot_bytes(model, lora: LoraSettings, rows: int, length: int, device: torch.device) -> int:
    """One slot's device memory on CUDA: the peak of a training forward/backward of ``rows``
    sequences of ``length`` tokens on a one-slot adapter, above what was allocated before,
    plus ``ADAPTER_COPIES`` times the slot's adapter weights."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    pairs = [EncodedPair(input_ids=(0,) * length, prompt_len=max(1, length // 2))] * rows
    was_training = model.training
    model.train()
    with attached_multi_lora(model, lora, 1) as multi:
        multi.init_slot(0, seed=0)
        with multi.routed(torch.zeros(rows, dtype=torch.long, device=device)):
            logp, _ = completion_logps(model, collate(pairs, 0).to(device))
            logp.sum().backward()
        adapter = sum(p.numel() * p.element_size() for p in multi.parameters())
        for param in multi.parameters():
            param.grad = None
    model.train(was_training)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()
    return peak + ADAPTER_COPIES * adapter


def pack_slots(model, lora: LoraSettings, works: list[UserTraining], batch_size: int, device: torch.device) -> int:
    """How many of ``works`` train at once on ``device`` (see the module's docstring)."""
    if torch.device(device).type != "cuda" or len(works) == 1:
        return len(works)
    length = max(len(s.pair.input_ids) for work in works for s in work.samples)
    rows = min(batch_size, max(len(work.samples) for work in works))
    free, _ = torch.cuda.mem_get_info(device)
    return slots_for(free, slot_bytes(model, lora, rows, length, device), len(works))
