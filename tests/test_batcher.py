"""The replica's own batcher (serving/batcher.py), without Ray: requests of any users share a
batch up to its size, each gets exactly its own rows' chunks in order, a request that comes
while a batch runs joins the next one, and a failed batch fails its requests only."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cbpo_orch.serving.batcher import StepBatcher


class Recorder:
    """A run_batch that answers row r with 'r:0', 'r:1', … for len(r) steps (None after), and
    records every batch it ran."""

    def __init__(self, gate: threading.Event | None = None, fail_on: str | None = None):
        self.batches: list[list[str]] = []
        self.gate, self.fail_on = gate, fail_on

    def __call__(self, rows: list[str], on_step) -> None:
        self.batches.append(list(rows))
        if self.gate is not None:
            self.gate.wait(timeout=10)
        if self.fail_on in rows:
            raise RuntimeError("out of memory")
        for step in range(max(len(r) for r in rows)):
            on_step([f"{r}:{step}" if step < len(r) else None for r in rows])


async def collect(batcher: StepBatcher, row: str) -> list[str]:
    return [chunk async for chunk in batcher.stream(row)]


def test_requests_of_different_users_share_a_batch_and_each_gets_its_own_chunks():
    async def scenario():
        run = Recorder()
        batcher = StepBatcher(run, max_batch_size=8, batch_wait_s=0.2)
        results = await asyncio.gather(*(collect(batcher, row) for row in ("alice", "bob", "carol")))
        return run, results

    run, results = asyncio.run(scenario())
    assert run.batches == [["alice", "bob", "carol"]]
    assert results == [[f"{r}:{i}" for i in range(len(r))] for r in ("alice", "bob", "carol")]


def test_a_batch_holds_at_most_max_batch_size_and_the_rest_run_next():
    async def scenario():
        run = Recorder()
        batcher = StepBatcher(run, max_batch_size=2, batch_wait_s=0.2)
        results = await asyncio.gather(*(collect(batcher, row) for row in ("a", "bb", "ccc", "dddd", "e")))
        return run, results

    run, results = asyncio.run(scenario())
    assert [len(batch) for batch in run.batches] == [2, 2, 1]
    assert sorted(row for batch in run.batches for row in batch) == ["a", "bb", "ccc", "dddd", "e"]
    assert results[3] == ["dddd:0", "dddd:1", "dddd:2", "dddd:3"]


def test_a_request_that_comes_while_a_batch_runs_joins_the_next_batch():
    async def scenario():
        gate = threading.Event()
        run = Recorder(gate)
        batcher = StepBatcher(run, max_batch_size=8, batch_wait_s=0.0)
        first = asyncio.ensure_future(collect(batcher, "first"))
        deadline = asyncio.get_running_loop().time() + 10
        while not run.batches and asyncio.get_running_loop().time() < deadline:  # the first batch runs, held at the gate
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(collect(batcher, "second"))
        for _ in range(3):  # the second request is queued at its first step; the loop waits on the first batch
            await asyncio.sleep(0)
        gate.set()
        return run, await first, await second

    run, first, second = asyncio.run(scenario())
    assert run.batches == [["first"], ["second"]]
    assert first[-1] == "first:4" and second[-1] == "second:5"


def test_a_failed_batch_fails_its_requests_and_the_next_batch_still_runs():
    async def scenario():
        run = Recorder(fail_on="boom")
        batcher = StepBatcher(run, max_batch_size=2, batch_wait_s=0.2)
        failed = await asyncio.gather(collect(batcher, "boom"), collect(batcher, "ok"), return_exceptions=True)
        return failed, await collect(batcher, "after")

    failed, after = asyncio.run(scenario())
    assert [type(f) for f in failed] == [RuntimeError, RuntimeError] and "out of memory" in str(failed[0])
    assert after == [f"after:{i}" for i in range(5)]


@pytest.mark.parametrize("size,wait", [(0, 0.1), (2, -1.0)])
def test_bad_settings_are_refused(size, wait):
    with pytest.raises(ValueError):
        StepBatcher(Recorder(), size, wait)
