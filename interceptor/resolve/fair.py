"""Careful-path queries served in a fair order between clients.

The hot path answers inline; everything else (cache misses, forwarded names, autopath) is a
coroutine that may wait on an upstream.  Started as they arrive, a flooding client's
thousands of queries would sit in the event loop's ready queue ahead of a quiet client's
one.  Here each client (by address) has its own queue; at most ``per_client`` of its
queries run at once, and freed slots go to the clients round-robin, so a quiet client's
query waits behind at most a few of anyone's.  A client whose queue is full loses the excess
(counted): it is the one sending faster than it is answered.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

Job = Callable[[], Coroutine[Any, Any, None]]


class FairScheduler:
    def __init__(self, max_running: int = 1024, per_client: int = 64, queued: int = 1024) -> None:
        self.max_running = max_running
        """Careful-path queries running at once, over every client."""
        self.per_client = per_client
        """...and for one client: its in-flight cap."""
        self.queued = queued
        """Queries one client may have waiting; beyond that they are dropped."""
        self.dropped = 0
        """Queries dropped because their client's queue was full."""
        self._queues: dict[str, deque[Job]] = {}
        self._running: dict[str, int] = {}
        self._ring: deque[str] = deque()
        """Clients with a query waiting and a free slot of their own, in service order."""
        self._in_ring: set[str] = set()
        self._total = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, client: str, job: Job) -> bool:
        """Run ``job`` in its client's turn; False (and counted) if the client's queue is
        full."""
        queue = self._queues.get(client)
        if queue is None:
            queue = self._queues[client] = deque()
        if len(queue) >= self.queued:
            self.dropped += 1
            return False
        queue.append(job)
        self._enter(client)
        self._pump()
        return True

    def busiest(self, n: int = 5) -> list[tuple[str, int, int]]:
        """(client, running, waiting) of the clients with the most queries waiting."""
        rows = [(c, self._running.get(c, 0), len(q)) for c, q in self._queues.items()]
        return sorted(rows, key=lambda r: (-r[2], -r[1], r[0]))[:n]

    def _enter(self, client: str) -> None:
        if (
            client not in self._in_ring
            and self._queues.get(client)
            and self._running.get(client, 0) < self.per_client
        ):
            self._ring.append(client)
            self._in_ring.add(client)

    def _pump(self) -> None:
        while self._total < self.max_running and self._ring:
            client = self._ring.popleft()
            self._in_ring.discard(client)
            queue = self._queues[client]
            job = queue.popleft()
            self._running[client] = self._running.get(client, 0) + 1
            self._total += 1
            task = asyncio.ensure_future(job())
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._done, client=client))
            self._enter(client)  # to the back of the ring: one query per turn

    def _done(self, task: asyncio.Task[None], client: str) -> None:
        self._tasks.discard(task)
        self._total -= 1
        running = self._running[client] - 1
        if running:
            self._running[client] = running
        else:
            del self._running[client]
            if not self._queues.get(client):
                self._queues.pop(client, None)
        self._enter(client)
        self._pump()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._queues.clear()
        self._ring.clear()
        self._in_ring.clear()
