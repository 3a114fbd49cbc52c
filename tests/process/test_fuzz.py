"""A short fuzz run against a real ``interceptor serve`` (the full run is
``python -m tests.bench.fuzz``): no crash, no reply dnspython's strict parser rejects, flat
memory, and valid queries among the fuzz answered right, over UDP and TCP, IPv4 and IPv6."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from devlab.netns import stop
from tests.fuzzing import Results, fuzz_tcp, fuzz_udp
from tests.helpers import Served, start_serve

UDP_PACKETS = int(os.environ.get("FUZZ_PACKETS", "20000"))


@pytest.fixture(scope="module", params=["127.0.0.1", "::1"])
def fuzzed(request: pytest.FixtureRequest) -> Iterator[Served]:
    host = request.param
    listen = f"[{host}]:0" if ":" in host else f"{host}:0"
    # The upstream is a closed local port: forwarded names fail fast (SERVFAIL), which the
    # fuzz must get through too.
    served = start_serve(
        "--listen", listen, "--upstream", "127.0.0.1:9", "--upstream-timeout", "0.2"
    )
    served.host = host
    yield served
    assert served.proc.poll() is None, "\n".join(served.log[-30:])  # no crash
    stop(served.proc)


def report(r: Results) -> str:
    bad = "\n".join(f"{q.hex()} -> {a.hex()}: {why}" for q, a, why in r.rejected[:5])
    return f"{r.sent} sent, {r.replies} replies, {len(r.rejected)} rejected\n{bad}"


def test_udp_fuzz(fuzzed: Served) -> None:
    r = fuzz_udp(fuzzed.host, fuzzed.port, UDP_PACKETS, seed=1, pid=fuzzed.proc.pid)
    assert r.replies > UDP_PACKETS // 4, report(r)  # most mutations are still answerable
    assert r.rejected == [], report(r)
    assert r.probe_failures == [], r.probe_failures
    warm, end = r.rss_kib[len(r.rss_kib) // 4], r.rss_kib[-1]
    assert end <= warm * 1.10 + 2048, r.rss_kib  # flat once warm (cache and buffers filled)


def test_tcp_fuzz(fuzzed: Served) -> None:
    r = fuzz_tcp(fuzzed.host, fuzzed.port, UDP_PACKETS // 10, seed=2)
    assert r.replies > 0 and r.rejected == [], report(r)
    assert r.probe_failures == [], r.probe_failures
