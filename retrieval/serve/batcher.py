"""Micro-batching: concurrent requests are answered by one model call.

Each request awaits `submit(item)`; one worker task takes whatever is queued (up to max_batch, waiting at most
wait_ms for a lone item to get company) and runs `fn(items)` in a single worker thread, so the model is never
called from two threads at once and each call does a batch's work for one batch's overhead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any


class MicroBatcher:
    def __init__(self, fn: Callable[[list[Any]], list[Any]], max_batch: int = 64, wait_ms: float = 1.0):
        """fn(items) -> one result per item; a result that is an Exception is raised to that item's caller."""
        self.fn, self.max_batch, self.wait = fn, max_batch, wait_ms / 1000.0
        self.queue: asyncio.Queue | None = None
        self.worker: asyncio.Task | None = None
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self.calls = 0  # model calls made, and items they answered: /metrics reports both
        self.items = 0

    async def submit(self, item: Any) -> Any:
        if self.queue is None:  # created lazily: it must belong to the running event loop
            self.queue = asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((item, future))
        result = await future
        if isinstance(result, Exception):
            raise result
        return result

    async def run_alone(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn on the model thread, in line with the batches (re-ranking, neighbours)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait
            while len(batch) < self.max_batch:
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            items = [item for item, _ in batch]
            try:
                results = await loop.run_in_executor(self.executor, self.fn, items)
            except Exception as e:  # noqa: BLE001 - the whole batch failed: every caller hears why
                results = [e] * len(items)
            self.calls += 1
            self.items += len(items)
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
