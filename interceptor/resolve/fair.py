"""Careful-path queries served in a fair order between clients.

The hot path answers inline; everything else (cache misses, forwarded names, autopath) is a
coroutine that may wait on an upstream.  Started as they arrive, a flooding client's
thousands of queries would sit in the event loop's ready queue ahead of a quiet client's
one.  Here each client (by address) has its own queue; at most ``per_client`` of its
queries run at once, and freed slots go to the clients round-robin.

The scheduler also paces itself against the event loop: each loop turn starts one *round*
(one query from each client that has one waiting, at most ``per_turn``), and the next round
waits for the next turn.  Between two rounds the loop polls the sockets, so a quiet client's
query is read and, if it has a hot answer, answered, after at most one round of work, not
after everything a flood has queued.  A client whose queue is full loses the excess
(counted): it is the one sending faster than it is answered.  A query that waited longer
than ``max_wait`` is dropped unstarted (counted): its client has given up on it.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

Job = Callable[[], Coroutine[Any, Any, None]]


class FairScheduler:
    def __init__(
        self,
        max_running: int = 1024,
        per_client: int = 64,
        queued: int = 1024,
        per_turn: int = 8,
        max_wait: float = 2.0,
        on_drop: Callable[[str], None] | None = None,
    ) -> None:
        self.max_running = max_running
        """Careful-path queries running at once, over every client."""
        self.per_client = per_client
        """...and for one client: its in-flight cap."""
        self.queued = queued
        """Queries one client may have waiting; beyond that they are dropped."""
        self.per_turn = per_turn
        """Queries started in one event-loop turn (one round of clients, at most this)."""
        self.max_wait = max_wait
        """Seconds a query may wait for its turn; later, its client has timed out."""
        self._queues: dict[str, deque[tuple[float, Job, Callable[[], None] | None]]] = {}
        self._running: dict[str, int] = {}
        self._ring: deque[str] = deque()
        """Clients with a query waiting and a free slot of their own, in service order."""
        self._in_ring: set[str] = set()
        self._total = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._scheduled: asyncio.Handle | None = None
        self._on_drop = on_drop if on_drop is not None else _ignore
        """Told the reason of each query dropped unstarted: ``full``, its client's queue was
        full; ``expired``, it waited longer than ``max_wait``.  The caller keeps the count
        (the resolver's stats, shared by every listener)."""

    def submit(self, client: str, job: Job, expired: Callable[[], None] | None = None) -> bool:
        """Run ``job`` in its client's turn; False (and counted) if the client's queue is
        full.  ``expired`` is called instead of the job if it waits past ``max_wait``."""
        queue = self._queues.get(client)
        if queue is None:
            queue = self._queues[client] = deque()
        if len(queue) >= self.queued:
            self._on_drop("full")
            return False
        queue.append((time.monotonic(), job, expired))
        self._enter(client)
        self._schedule()
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

    def _schedule(self) -> None:
        if self._scheduled is None and self._ring and self._total < self.max_running:
            self._scheduled = asyncio.get_running_loop().call_soon(self._round)

    def _round(self) -> None:
        """One round: the next query of each client in the ring, in ring order."""
        self._scheduled = None
        ring = self._ring
        deadline = time.monotonic() - self.max_wait
        for _ in range(min(len(ring), self.per_turn)):
            if self._total >= self.max_running:
                break
            client = ring.popleft()
            self._in_ring.discard(client)
            queue = self._queues[client]
            while queue and queue[0][0] < deadline:
                gone = queue.popleft()[2]
                if gone is not None:
                    gone()
                self._on_drop("expired")
            if not queue:
                self._forget(client)
                continue
            job = queue.popleft()[1]
            self._running[client] = self._running.get(client, 0) + 1
            self._total += 1
            task = asyncio.ensure_future(job())
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._done, client=client))
            self._enter(client)  # to the back of the ring: one query per round
        self._schedule()

    def _done(self, task: asyncio.Task[None], client: str) -> None:
        self._tasks.discard(task)
        self._total -= 1
        running = self._running[client] - 1
        if running:
            self._running[client] = running
        else:
            del self._running[client]
        self._forget(client)
        self._enter(client)
        self._schedule()

    def _forget(self, client: str) -> None:
        if not self._running.get(client) and not self._queues.get(client):
            self._queues.pop(client, None)

    def close(self) -> None:
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._scheduled = None
        for task in list(self._tasks):
            task.cancel()
        self._queues.clear()
        self._ring.clear()
        self._in_ring.clear()


def _ignore(reason: str) -> None:
    pass
