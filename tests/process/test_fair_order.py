"""The resolver serves clients in turn: one client flooding names behind a slow upstream
fills its own queue (its excess dropped and counted), while another client's forwarded name
is answered at the upstream's own pace, not after the flood's backlog."""

from __future__ import annotations

import socket
import time

import dns.message

from devlab.netns import stop
from tests.helpers import FakeUpstream, free_port, start_serve
from tests.process.test_forwarding import scrape

FLOOD = 3000
DELAY = 0.3


def test_a_quiet_client_is_not_queued_behind_a_flooding_one() -> None:
    up = FakeUpstream(delay=DELAY, ttl=0)
    mport = free_port()
    served = start_serve(
        "--upstream", f"127.0.0.1:{up.port}", "--metrics-address", f"127.0.0.1:{mport}",
        "--upstream-timeout", "5",
    )  # fmt: skip
    try:
        # 127.0.0.1 floods distinct names (nothing to coalesce, nothing cached): 64 run, 1,024
        # wait, the rest are dropped.  Served first come, first served, the quiet client's
        # query would wait for 1,024 / 64 rounds of 0.3 s.
        flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        flood.bind(("127.0.0.1", 0))
        for i in range(FLOOD):
            q = dns.message.make_query(f"flood{i}.example.org", "A")
            flood.sendto(q.to_wire(), ("127.0.0.1", served.port))
        time.sleep(0.5)
        quiet = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        quiet.bind(("127.0.0.2", 0))  # another client address: its own queue
        quiet.settimeout(5)
        q = dns.message.make_query("quiet.example.org", "A")
        t0 = time.monotonic()
        quiet.sendto(q.to_wire(), ("127.0.0.1", served.port))
        reply = dns.message.from_wire(quiet.recv(4096))
        waited = time.monotonic() - t0
        assert reply.id == q.id and reply.answer, reply
        assert waited < DELAY + 1.0, waited  # its turn came at once; only the upstream's pace
        metrics = scrape(mport)
        full = metrics[("interceptor_client_queue_dropped_total", (("reason", "full"),))]
        assert full >= FLOOD - 64 - 1024 - 100, full  # the flood's excess, counted
        flood.close()
        quiet.close()
    finally:
        stop(served.proc)
        up.close()
