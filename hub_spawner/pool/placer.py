"""Allocation requests that arrive together are placed together.

In a lab's first minute hundreds of servers start at once.  Each placement is a few statements, but
its transaction (begin, placement lock, commit) costs as much again, and the pool's event loop does
one thing at a time.  The requests the loop has read when it gets to placing go into one
transaction (AllocationBook.allocate_many), in the order they came; a lone request is placed at
once, as before.
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("gpulab.pool")

MOST = 64  # requests in one transaction: the placement lock is held this long at most


class BatchPlacer:
    """Places the allocation requests of ``book`` in batches, on the running event loop."""

    def __init__(self, book, most: int = MOST):
        self.book, self.most = book, most
        self._waiting: list[tuple[dict, asyncio.Future]] = []
        self._scheduled = False

    async def place(self, spec: dict):
        """What AllocationBook.allocate_many answers for ``spec``: (allocation, token, worker), or the
        InvalidRequest or NoFit that says why not."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append((spec, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._place_waiting)
        return await future

    def _place_waiting(self) -> None:
        batch, self._waiting = self._waiting[:self.most], self._waiting[self.most:]
        self._scheduled = bool(self._waiting)
        if self._waiting:
            asyncio.get_running_loop().call_soon(self._place_waiting)
        try:
            results = self.book.allocate_many([spec for spec, _ in batch])
        except Exception as exc:  # the database failed: every request of the batch gets the error
            log.error("placing %d request(s) failed: %s", len(batch), exc)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results):
            if not future.done():  # never cancelled by tornado; the others are answered all the same
                future.set_result(result)
