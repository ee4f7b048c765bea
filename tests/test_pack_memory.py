"""How many users one device trains at once: slots from free memory (hand-computed), every
user a slot where there is no device memory to size against, and a pack wider than its
slots still gives every user its own adapter and answers (tiny random-weight model)."""

from __future__ import annotations

import pytest
import torch

from cbpo_orch.training.pack_memory import pack_slots, slots_for
from tests.helpers import LORA, user_work


def test_slots_are_what_the_headroom_of_free_memory_holds():
    gib = 2**30
    assert slots_for(80 * gib, 3 * gib, users=64) == 21  # 0.8 · 80 GiB = 64 GiB → 21 slots of 3 GiB
    assert slots_for(80 * gib, 3 * gib, users=8) == 8  # never more slots than users
    assert slots_for(2 * gib, 3 * gib, users=8) == 1  # a user too large still gets its one slot
    assert slots_for(10 * gib, 2 * gib, users=8, headroom=0.5) == 2


def test_a_cpu_gives_every_user_of_the_pack_a_slot(loaded):  # noqa: F811
    tokenizer, pad_id = loaded.tokenizer, loaded.tokenizer.pad_token_id
    works = [user_work(tokenizer, u, 3, 3, "sft", pad_id, loaded.model) for u in range(3)]
    assert pack_slots(loaded.model, LORA, works, 4, torch.device("cpu")) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measures CUDA memory: needs a GPU")
def test_a_gpu_measures_one_slot_and_fits_the_pack_in_its_free_memory(loaded):  # noqa: F811
    tokenizer, pad_id = loaded.tokenizer, loaded.tokenizer.pad_token_id
    model = loaded.model.to("cuda")
    works = [user_work(tokenizer, u, 3, 3, "sft", pad_id, model) for u in range(3)]
    try:
        assert 1 <= pack_slots(model, LORA, works, 4, torch.device("cuda")) <= 3
    finally:
        model.to("cpu")
