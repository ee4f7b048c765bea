"""The scheduler's pack and retry policies (orchestrator/packing.py), without Ray: the order
work goes out in, the size of a pack, which units share one, and what a landed pack means."""

from __future__ import annotations

from cbpo_orch.method.config import TrainConfig
from cbpo_orch.orchestrator.packing import Failure, PackQueue, Work, largest_first, pack_size
from cbpo_orch.orchestrator.spec import GPU_PACK, Resources

SFT, CBPO = TrainConfig(method="sft"), TrainConfig(method="cbpo")


def test_work_goes_out_by_method_then_largest_history_first():
    sft, cbpo = TrainConfig(method="sft"), TrainConfig(method="cbpo")
    work = [Work(1, "a", sft), Work(2, "a", cbpo), Work(3, "b", sft), Work(4, "b", cbpo), Work(5, "c", sft), Work(6, "d", sft)]
    order = largest_first(work, {"a": 3, "b": 40, "c": 3})
    assert [unit.key for unit in order] == [4, 2, 3, 1, 5, 6]  # cbpo: b, a; sft: b, then a and c (tied, by id), d unknown


def test_packs_default_to_one_user_on_a_cpu_and_a_full_pack_on_a_whole_gpu_and_even_out_at_the_end():
    assert Resources().pack_size == 1
    assert Resources(gpus_per_user=0.5).pack_size == 1, "workers sharing a GPU cannot size packs from its memory"
    assert Resources(gpus_per_user=1).pack_size == GPU_PACK
    assert Resources(gpus_per_user=1, users_per_step=4).pack_size == 4
    assert pack_size(waiting=100, actors=2, users_per_step=32) == 32
    assert pack_size(waiting=36, actors=2, users_per_step=32) == 18  # the last 36 split over both workers
    assert pack_size(waiting=1, actors=4, users_per_step=32) == 1
    assert pack_size(waiting=5, actors=1, users_per_step=1) == 1


def _queue(units, users_per_step=4, started=None):
    started = [] if started is None else started
    return PackQueue(units, users_per_step, lambda unit: started.append(unit.key) or unit.key != "cancelled")


def test_a_pack_holds_units_of_one_config_in_order_and_the_rest_keep_their_place():
    packs = _queue([Work(1, "a", SFT), Work(2, "b", CBPO), Work(3, "c", SFT), Work(4, "d", SFT), Work(5, "e", CBPO)], users_per_step=3)
    assert [u.key for u in packs.next_pack(workers=1)] == [1, 3, 4]
    assert [u.key for u in packs.next_pack(workers=1)] == [2, 5]
    assert len(packs) == 0


def test_a_pack_is_at_most_an_even_share_of_what_waits_so_the_last_ones_shrink():
    packs = _queue([Work(k, f"u{k}", SFT) for k in range(6)], users_per_step=8)
    assert [len(packs.next_pack(workers=2)) for _ in range(3)] == [3, 2, 1]


def test_a_unit_that_start_drops_is_not_sent():
    started = []
    packs = _queue([Work("cancelled", "a", SFT), Work(2, "b", SFT)], users_per_step=2, started=started)
    assert [u.key for u in packs.next_pack(workers=1)] == [2] and started == ["cancelled", 2]


def test_the_failures_of_a_failed_pack_are_shared_and_their_retries_go_alone():
    packs = _queue([Work(1, "a", SFT), Work(2, "b", SFT), Work(3, "c", SFT)], users_per_step=2)
    pack = packs.next_pack(workers=1)
    results = packs.landed(pack, [Failure("worker died: OOM", permanent=False), "ok"])
    assert results == [Failure("worker died: OOM", permanent=False, shared=True), "ok"]
    packs.extend([pack[0]])  # the driver's retry
    assert [u.key for u in packs.next_pack(workers=1)] == [3]
    assert [u.key for u in packs.next_pack(workers=1)] == [1], "a unit whose pack failed goes alone"
    alone = packs.landed([Work(9, "z", SFT)], [Failure("boom", permanent=True)])
    assert alone == [Failure("boom", permanent=True)], "a pack of one keeps its own failure"


def test_drain_empties_the_queue_in_order():
    packs = _queue([Work(k, f"u{k}", SFT) for k in range(3)])
    assert [u.key for u in packs.drain()] == [0, 1, 2] and not packs
