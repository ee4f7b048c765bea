"""Cross-user batching for one replica: the engine loop that vLLM and Ray Serve LLM run, in a
few lines and with no Ray in it.

Requests wait in one queue. A loop takes the first, waits at most ``batch_wait_s`` for more
(up to ``max_batch_size``), runs the batch through ``run_batch(rows, on_step)`` in a thread,
and hands each step's chunk to the stream of the request it belongs to; the next batch forms
while nothing runs. Every row is one user's request, whichever user: rows of many users share
one generate (``generator.BatchedGenerator``), which is the point of it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Generic, TypeVar

RowT = TypeVar("RowT")
ChunkT = TypeVar("ChunkT")

_END = object()
"""Put on a request's stream after its batch has run."""


class StepBatcher(Generic[RowT, ChunkT]):
    """``run_batch(rows, on_step)`` runs one batch (blocking; it is called in a worker thread)
    and calls ``on_step`` after every step with one entry per row: its new chunk, or None for
    a row with nothing new (it has ended)."""

    def __init__(self, run_batch: Callable[[list[RowT], Callable[[list[ChunkT | None]], None]], object], max_batch_size: int, batch_wait_s: float):
        if max_batch_size < 1 or batch_wait_s < 0:
            raise ValueError("max_batch_size must be ≥ 1 and batch_wait_s ≥ 0")
        self.run_batch, self.max_batch_size, self.batch_wait_s = run_batch, max_batch_size, batch_wait_s
        self._waiting: asyncio.Queue | None = None
        self._loop_task: asyncio.Task | None = None

    async def stream(self, row: RowT) -> AsyncIterator[ChunkT]:
        """``row``'s chunks as its batch produces them; raises what its batch raised."""
        own: asyncio.Queue = asyncio.Queue()
        await self._queue().put((row, own))
        while (item := await own.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _queue(self) -> asyncio.Queue:
        """The waiting queue, with the loop that drains it started on first use (both belong
        to the running event loop)."""
        if self._waiting is None:
            self._waiting = asyncio.Queue()
            self._loop_task = asyncio.get_running_loop().create_task(self._drain())
        return self._waiting

    async def _drain(self) -> None:
        while True:
            await self._run(await self._next_batch())

    async def _next_batch(self) -> list[tuple[RowT, asyncio.Queue]]:
        waiting = self._waiting
        batch = [await waiting.get()]
        deadline = asyncio.get_running_loop().time() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            left = deadline - asyncio.get_running_loop().time()
            try:
                batch.append(waiting.get_nowait() if left <= 0 else await asyncio.wait_for(waiting.get(), left))
            except (asyncio.QueueEmpty, asyncio.TimeoutError):
                break
        return batch

    async def _run(self, batch: list[tuple[RowT, asyncio.Queue]]) -> None:
        loop = asyncio.get_running_loop()
        rows, streams = [row for row, _ in batch], [own for _, own in batch]

        def on_step(chunks: list[ChunkT | None]) -> None:
            loop.call_soon_threadsafe(_deliver, streams, list(chunks))

        try:
            await asyncio.to_thread(self.run_batch, rows, on_step)
        except Exception as error:  # every request of the batch fails with it; the loop goes on
            for own in streams:
                own.put_nowait(error)
        for own in streams:
            own.put_nowait(_END)


def _deliver(streams: list[asyncio.Queue], chunks: list) -> None:
    for own, chunk in zip(streams, chunks):
        if chunk is not None:
            own.put_nowait(chunk)
