"""The node cache in front of forwarding, against a running ``interceptor serve``: a real
dnsmasq upstream whose log counts what reaches it, and an in-process fake upstream for
slowness and blackholing."""

from __future__ import annotations

import concurrent.futures as cf
import socket
import time
import urllib.request
from collections.abc import Iterator

import dns.rcode
import pytest

from devlab.netns import stop
from tests.helpers import Dnsmasq, FakeUpstream, Served, ask, free_tcp_ports, start_serve


@pytest.fixture
def fake() -> Iterator[FakeUpstream]:
    up = FakeUpstream(delay=0.3)
    yield up
    up.close()


def test_second_query_and_negative_answer_come_from_the_cache(
    served: Served, upstream: Dnsmasq
) -> None:
    for _ in range(3):
        assert served.ask("other.example").answer
    assert len(upstream.queries("other.example")) == 1
    for _ in range(3):
        assert served.ask("cached-nx.upstream.test").rcode() == dns.rcode.NXDOMAIN
    assert len(upstream.queries("cached-nx.upstream.test")) == 1


def test_ttl_counts_down(served: Served) -> None:
    first = served.ask("www.upstream.test").answer[0].ttl
    time.sleep(2.1)
    second = served.ask("www.upstream.test").answer[0].ttl
    assert first <= 60 and second <= first - 2


def test_100_concurrent_identical_queries_share_one_upstream_query(fake: FakeUpstream) -> None:
    s = start_serve("--upstream", f"127.0.0.1:{fake.port}")
    try:
        with cf.ThreadPoolExecutor(100) as pool:
            replies = list(
                pool.map(lambda _: ask(s.host, s.port, "same.example", timeout=5), range(100))
            )
        assert all(r.answer[0][0].to_text() == "192.0.2.99" for r in replies)
        assert fake.received.count("same.example.") == 1
    finally:
        stop(s.proc)


def test_blackholed_upstream_serves_stale_then_servfail_for_new_names(fake: FakeUpstream) -> None:
    fake.delay, fake.ttl = 0.0, 1
    s = start_serve("--upstream", f"127.0.0.1:{fake.port}", "--upstream-timeout", "0.2")
    try:
        assert ask(s.host, s.port, "stale.example").answer
        fake.answering = False
        time.sleep(1.2)  # the entry expires
        m = ask(s.host, s.port, "stale.example", timeout=5)
        assert m.rcode() == dns.rcode.NOERROR and m.answer[0].ttl == 30  # RFC 8767
        t0 = time.monotonic()
        assert ask(s.host, s.port, "never-seen.example", timeout=5).rcode() == dns.rcode.SERVFAIL
        assert time.monotonic() - t0 < 1.0  # 2 attempts x 0.2 s
    finally:
        stop(s.proc)


def test_forged_upstream_replies_are_ignored(fake: FakeUpstream) -> None:
    fake.delay, fake.spoof = 0.05, True
    s = start_serve("--upstream", f"127.0.0.1:{fake.port}")
    try:
        m = ask(s.host, s.port, "target.example", timeout=5)
        assert [r.to_text() for rr in m.answer for r in rr] == ["192.0.2.99"]
        assert "possible spoofing" in "\n".join(s.log)
    finally:
        stop(s.proc)


def test_cache_figures_are_exported(fake: FakeUpstream) -> None:
    fake.delay = 0.0
    (mport,) = free_tcp_ports(1)
    s = start_serve(
        "--upstream", f"127.0.0.1:{fake.port}", "--metrics-address", f"127.0.0.1:{mport}"
    )
    try:
        for _ in range(3):
            ask(s.host, s.port, "metered.example")
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "interceptor_cache_hits_total 2.0" in text
        assert "interceptor_cache_misses_total 1.0" in text
        assert "interceptor_cache_entries 1.0" in text
    finally:
        stop(s.proc)


def test_dead_upstream_is_skipped_after_it_keeps_failing(fake: FakeUpstream) -> None:
    fake.delay = 0.0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        dead = blackhole.getsockname()[1]
        s = start_serve(
            "--upstream",
            f"127.0.0.1:{dead}",
            "--upstream",
            f"127.0.0.1:{fake.port}",
            "--upstream-timeout",
            "0.4",
        )
        try:
            took = []
            for i in range(6):
                t0 = time.monotonic()
                m = ask(s.host, s.port, f"n{i}.example", timeout=5)  # distinct: no cache hits
                took.append(time.monotonic() - t0)
                assert m.answer[0][0].to_text() == "192.0.2.99"
            assert took[0] >= 0.4 and took[1] >= 0.4  # the dead server's timeout, twice
            assert max(took[2:]) < 0.2, took  # then it is skipped
            assert "is not answering: skipping it" in "\n".join(s.log)
        finally:
            stop(s.proc)


def test_forward_zone_goes_to_its_own_servers(fake: FakeUpstream, upstream: Dnsmasq) -> None:
    fake.delay = 0.0
    s = start_serve(
        "--upstream",
        f"127.0.0.1:{upstream.port}",
        "--forward",
        f"corp.example=127.0.0.1:{fake.port}",
    )
    try:
        assert ask(s.host, s.port, "a.b.corp.example").answer[0][0].to_text() == "192.0.2.99"
        assert fake.received == ["a.b.corp.example."]
        assert ask(s.host, s.port, "www.upstream.test").answer[0][0].to_text() == "192.0.2.53"
        assert fake.received == ["a.b.corp.example."]  # other names: the default upstream
    finally:
        stop(s.proc)
