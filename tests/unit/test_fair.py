"""The fair order of careful-path queries: round-robin between clients, one round per event
loop turn, an in-flight cap per client, and a bounded queue whose excess (or whose stale
queries) are dropped and counted."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

from interceptor.resolve.fair import FairScheduler


def drop_counter() -> tuple[Counter[str], Callable[[str], None]]:
    """Drops by reason, and the ``on_drop`` that counts them (the scheduler only reports)."""
    drops: Counter[str] = Counter()
    return drops, lambda reason: drops.update((reason,))


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_flooding_client_does_not_delay_a_quiet_one() -> None:
    drops, on_drop = drop_counter()

    async def run() -> tuple[list[str], int]:
        fair = FairScheduler(max_running=2, per_client=2, queued=100, on_drop=on_drop)
        started: list[str] = []
        release = asyncio.Event()

        def job(name: str) -> None:
            async def go() -> None:
                started.append(name)
                await release.wait()

            fair.submit(name.split("-")[0], go)

        for i in range(50):
            job(f"noisy-{i}")
        job("quiet-0")
        await _turns(3)
        # The two slots went to one query of each client, not to the flood's first two.
        assert sorted(started) == ["noisy-0", "quiet-0"]
        release.set()
        await _turns(200)
        return started, drops["full"]

    started, dropped = asyncio.run(run())
    assert len(started) == 51 and dropped == 0


def test_one_round_per_loop_turn() -> None:
    """Between two rounds the loop gets a turn (to poll its sockets): a flood of 40 queued
    queries from one client starts one per turn, with per_turn bounding a round."""

    async def run() -> list[int]:
        fair = FairScheduler(max_running=100, per_client=100, queued=100, per_turn=3)
        started = 0
        per_turn: list[int] = []

        async def go() -> None:
            nonlocal started
            started += 1

        for _ in range(40):
            fair.submit("10.0.0.1", go)
        for i in range(4):
            fair.submit(f"10.0.1.{i}", go)
        for _ in range(6):
            before = started
            await _turns(1)
            per_turn.append(started - before)
        await _turns(100)
        return per_turn

    per_turn = asyncio.run(run())
    assert max(per_turn) <= 3, per_turn
    assert sum(per_turn) >= 5, per_turn


def test_per_client_in_flight_cap() -> None:
    async def run() -> int:
        fair = FairScheduler(max_running=100, per_client=3, queued=100)
        running = 0
        peak = 0
        gate = asyncio.Event()

        async def go() -> None:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await gate.wait()
            running -= 1

        for _ in range(20):
            fair.submit("10.0.0.1", go)
        await _turns(10)
        gate.set()
        await _turns(100)
        assert running == 0 and not fair.busiest()
        return peak

    assert asyncio.run(run()) == 3


def test_a_full_queue_drops_the_excess_and_counts_it() -> None:
    drops, on_drop = drop_counter()

    async def run() -> FairScheduler:
        fair = FairScheduler(max_running=1, per_client=1, queued=5, on_drop=on_drop)
        gate = asyncio.Event()

        async def go() -> None:
            await gate.wait()

        accepted = [fair.submit("10.0.0.1", go) for _ in range(6)]
        await _turns(2)  # one starts
        accepted += [fair.submit("10.0.0.1", go) for _ in range(4)]
        # Five wait, the sixth is dropped; once one has started, one more fits.
        assert accepted == [True] * 5 + [False] + [True] + [False] * 3, accepted
        assert fair.busiest() == [("10.0.0.1", 1, 5)]
        gate.set()
        await _turns(50)
        return fair

    fair = asyncio.run(run())
    assert drops == {"full": 4} and fair.busiest() == []


def test_a_query_that_waited_past_its_clients_patience_is_not_started() -> None:
    drops, on_drop = drop_counter()

    async def run() -> tuple[int, int]:
        fair = FairScheduler(max_running=1, per_client=1, queued=10, max_wait=0.05, on_drop=on_drop)
        started = 0
        gate = asyncio.Event()

        async def go() -> None:
            nonlocal started
            started += 1
            await gate.wait()

        for _ in range(4):
            fair.submit("10.0.0.1", go)
        await _turns(3)
        await asyncio.sleep(0.1)  # the three waiting ones are now older than max_wait
        fair.submit("10.0.0.1", go)
        gate.set()
        await _turns(50)
        return started, drops["expired"]

    assert asyncio.run(run()) == (2, 3)
