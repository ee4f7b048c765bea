"""Packing users never changes a user's result: train_adapters with 4 users of unequal
sizes in one forward/backward per step (as on a GPU), or streamed through 2 slots (a slot
whose user ends takes the next) with each user's rows in a pass of their own (as on a CPU),
gives each the losses, weights, reference state and chosen epoch it gets trained alone
(one slot), for every method (tiny random-weight model, fp32, dropout 0)."""

from __future__ import annotations

import pytest
import torch

from cbpo_orch.method.config import TrainConfig
from cbpo_orch.training.multi_lora import attached_multi_lora
from cbpo_orch.training.trainer import slot_schedule, train_adapters, users_per_pass
from tests.helpers import LORA, user_work

SIZES = ((3, 4), (5, 5), (8, 3), (11, 9))  # (own items, aux items) per user
RTOL, ATOL = 1e-5, 1e-6
STATE_ATOL = 1e-5  # reference states are sums of ~24 fp32 rewards that partly cancel


def same_state(a: dict, b: dict) -> bool:
    """Equal reference-point states: equal keys and strings, numbers within STATE_ATOL."""
    return a.keys() == b.keys() and all(
        a[k] == pytest.approx(b[k], rel=RTOL, abs=STATE_ATOL) if isinstance(a[k], list) else a[k] == b[k] for k in a
    )


@pytest.mark.parametrize("method", ["sft", "kto", "bco", "cbpo"])
def test_users_trained_together_get_what_each_gets_alone(loaded, method):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer, pad_id = loaded.tokenizer, loaded.tokenizer.pad_token_id
        config = TrainConfig(method=method, epochs=2, lr=1e-2, batch_size=4, lora=LORA)
        work = [user_work(tokenizer, u, n_own, n_aux, method, pad_id, loaded.model) for u, (n_own, n_aux) in enumerate(SIZES)]
        with attached_multi_lora(loaded.model, LORA, len(work)) as multi:
            together = train_adapters(multi, tokenizer, work, config, "cpu", per_pass=len(work))
            packed = [multi.slot_state(slot) for slot in range(len(work))]
        ended = {}
        with attached_multi_lora(loaded.model, LORA, 2) as multi:
            refilled = train_adapters(multi, tokenizer, work, config, "cpu", on_done=lambda u, slot, _: ended.setdefault(u, multi.slot_state(slot)))
        assert sorted(ended) == [0, 1, 2, 3], "every user's adapter is handed over once, when it ends"
        for u, user in enumerate(work):
            with attached_multi_lora(loaded.model, LORA, 1) as multi:
                [alone] = train_adapters(multi, tokenizer, [user], config, "cpu")
                weights = multi.slot_state(0)
            for result, state in ((together[u], packed[u]), (refilled[u], ended[u])):
                assert result.steps == alone.steps
                assert result.losses == pytest.approx(alone.losses, rel=RTOL, abs=ATOL)
                assert result.validation_scores == pytest.approx(alone.validation_scores, rel=RTOL)
                assert result.selected_epoch == alone.selected_epoch
                assert same_state(result.reference_state, alone.reference_state)
                for key, value in weights.items():
                    torch.testing.assert_close(state[key], value, rtol=RTOL, atol=ATOL)
        assert len({r.steps for r in together}) > 1, "the users must have unequal numbers of steps"
        assert any(float(v.abs().max()) > 0 for state in packed for k, v in state.items() if "lora_B" in k), "some adapter must move"
    finally:
        torch.set_num_threads(threads)


def test_slot_schedule_gives_each_freed_slot_the_next_user_at_the_next_step():
    # 2 slots, users of 3, 1, 2 and 2 steps: user 1 frees slot 1 after step 0, user 2 takes it
    # at step 1 until step 3, when slot 0 (free since 3, the lower slot on the tie) takes user 3
    assert slot_schedule([3, 1, 2, 2], 2) == [(0, 0), (1, 0), (1, 1), (0, 3)]
    assert slot_schedule([2, 2], 4) == [(0, 0), (1, 0)]
    with pytest.raises(ValueError, match="at least one training step"):
        slot_schedule([2, 0], 2)


def test_more_users_than_slots_need_someone_to_take_each_ended_adapter(loaded):
    tokenizer, pad_id = loaded.tokenizer, loaded.tokenizer.pad_token_id
    work = [user_work(tokenizer, u, 3, 3, "sft", pad_id, loaded.model) for u in range(3)]
    with attached_multi_lora(loaded.model, LORA, 2) as multi, pytest.raises(ValueError, match="3 users for 2 adapter slots need an on_done"):
        train_adapters(multi, tokenizer, work, TrainConfig(method="sft", epochs=1, lora=LORA), "cpu")


def rows_per_forward(model) -> tuple[list[int], object]:
    """The batch sizes of ``model``'s forwards, recorded from now on (and the hook's handle):
    those of its decoder body, which every log-prob pass runs (``logprobs.py`` calls it directly)."""
    sizes: list[int] = []
    handle = model.base_model.register_forward_pre_hook(lambda _, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    return sizes, handle


def test_a_cpu_step_passes_each_users_rows_alone_and_a_gpu_step_passes_all(loaded):
    assert users_per_pass("cpu", 8) == 1
    assert users_per_pass(torch.device("cuda"), 8) == 8
    tokenizer, pad_id = loaded.tokenizer, loaded.tokenizer.pad_token_id
    config = TrainConfig(method="sft", epochs=1, batch_size=4, lora=LORA)
    work = [user_work(tokenizer, u, n_own, n_aux, "sft", pad_id, loaded.model) for u, (n_own, n_aux) in enumerate(SIZES)]
    for user in work:
        user.validate = None  # its forwards are not the step's
    for per_pass, first_step in ((None, [4, 4, 4, 4]), (4, [16]), (3, [12, 4])):
        sizes, handle = rows_per_forward(loaded.model)
        try:
            with attached_multi_lora(loaded.model, LORA, len(work)) as multi:
                train_adapters(multi, tokenizer, work, config, "cpu", per_pass=per_pass)
        finally:
            handle.remove()
        assert sizes[: len(first_step)] == first_step, per_pass
