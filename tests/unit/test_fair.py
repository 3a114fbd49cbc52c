"""The fair order of careful-path queries: round-robin between clients, an in-flight cap per
client, and a bounded queue whose excess is dropped and counted."""

from __future__ import annotations

import asyncio

from interceptor.resolve.fair import FairScheduler


def test_a_flooding_client_does_not_delay_a_quiet_one() -> None:
    async def run() -> tuple[list[str], int]:
        fair = FairScheduler(max_running=2, per_client=2, queued=100)
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
        await asyncio.sleep(0)
        # Both slots went to the noisy client's first two queries.
        assert started == ["noisy-0", "noisy-1"]
        release.set()
        for _ in range(10):
            await asyncio.sleep(0)
        return started, fair.dropped

    started, dropped = asyncio.run(run())
    # The quiet client's query ran in the next round, not after the other 48.
    assert started.index("quiet-0") <= 3, started
    assert dropped == 0


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
        await asyncio.sleep(0)
        gate.set()
        for _ in range(30):
            await asyncio.sleep(0)
        assert running == 0 and not fair.busiest()
        return peak

    assert asyncio.run(run()) == 3


def test_a_full_queue_drops_the_excess_and_counts_it() -> None:
    async def run() -> FairScheduler:
        fair = FairScheduler(max_running=1, per_client=1, queued=5)
        gate = asyncio.Event()

        async def go() -> None:
            await gate.wait()

        accepted = [fair.submit("10.0.0.1", go) for _ in range(10)]
        assert accepted == [True] * 6 + [False] * 4  # one running, five waiting
        assert fair.busiest() == [("10.0.0.1", 1, 5)]
        gate.set()
        for _ in range(20):
            await asyncio.sleep(0)
        return fair

    fair = asyncio.run(run())
    assert fair.dropped == 4 and fair.busiest() == []
