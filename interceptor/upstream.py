"""Forwarding to upstream servers: UDP first, TCP when the answer is truncated.

Every attempt uses a fresh random transaction ID and a fresh socket (so a fresh random source
port from the kernel), and a reply is only accepted when it comes from the server asked (the
socket is connected), carries our ID, is a response, and repeats our question (RFC 5452
section 9.1).  Anything else is ignored and the attempt keeps waiting.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from interceptor.dns.message import skip_name
from interceptor.dns.wire import encode_name
from interceptor.logutil import RateLimitedLog
from interceptor.settings import Endpoint, UpstreamSettings

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log)


class UpstreamFailed(Exception):
    """No upstream gave a usable answer in time."""


def _matches(reply: bytes, query: bytes) -> bool:
    """Same ID, QR set, and the same question (names compared case-insensitively)."""
    if len(reply) < 12 or reply[:2] != query[:2] or not reply[2] & 0x80:
        return False
    try:
        end = skip_name(query, 12) + 4
    except (ValueError, IndexError):
        return False
    if reply[4:6] != b"\x00\x01":
        # A FORMERR/NOTIMP may legitimately carry no question.
        return reply[4:6] == b"\x00\x00" and reply[3] & 0x0F in (1, 4)
    return reply[12:end].lower() == query[12:end].lower()


class _UdpExchange(asyncio.DatagramProtocol):
    def __init__(self, query: bytes) -> None:
        self.query = query
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.done.done() and _matches(data, self.query):
            self.done.set_result(data)
        elif not self.done.done():
            _rl.warning(
                "upstream-mismatch",
                "ignored a reply that does not match its query "
                "(wrong ID or question): possible spoofing",
            )

    def error_received(self, exc: Exception) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


@dataclass
class Health:
    """What we know of one upstream: a server that keeps failing is skipped for a while
    (5 s, doubling to 60 s) so that it does not make every query wait for its timeout."""

    failures: int = 0
    down_until: float = 0.0

    def up(self, now: float) -> bool:
        return now >= self.down_until


class Forwarder:
    """Sends a client's query to upstream servers and returns the reply for that client."""

    def __init__(
        self, settings: UpstreamSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.health: dict[Endpoint, Health] = {}

    def order(self, servers: Sequence[Endpoint]) -> list[Endpoint]:
        """Servers that are up first (in the configured order), then the others: when all
        are down we still try, which is also how a recovered server is noticed."""
        now = self.clock()
        up = [s for s in servers if self.health.get(s, Health()).up(now)]
        return up + [s for s in servers if s not in up]

    def _failed(self, server: Endpoint) -> None:
        h = self.health.setdefault(server, Health())
        h.failures += 1
        if h.failures >= 2:
            backoff = min(60.0, 5.0 * 2 ** (h.failures - 2))
            h.down_until = self.clock() + backoff
            _rl.warning(
                f"upstream-down-{server}",
                "upstream %s is not answering: skipping it for %.0fs",
                server,
                backoff,
            )

    def _worked(self, server: Endpoint) -> None:
        h = self.health.get(server)
        if h is not None and h.failures:
            if h.failures >= 2:
                log.info("upstream %s answers again", server)
            self.health[server] = Health()

    async def forward(self, query: bytes, servers: Sequence[Endpoint]) -> bytes:
        """The upstream reply to ``query`` (client's ID restored).  Raises UpstreamFailed."""
        if not servers:
            raise UpstreamFailed("no upstream servers configured")
        client_id = query[:2]
        last: Exception | None = None
        order = self.order(servers)
        for attempt in range(self.settings.attempts):
            server = order[attempt % len(order)]
            msg = secrets.token_bytes(2) + query[2:]
            try:
                reply = await self._udp(msg, server)
                if reply[2] & 0x02:  # TC: ask again over TCP (RFC 7766 section 5)
                    msg = secrets.token_bytes(2) + query[2:]
                    reply = await self._tcp(msg, server)
                self._worked(server)
                return client_id + reply[2:]
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
                last = exc
                self._failed(server)
                _rl.warning(
                    f"upstream-{server}",
                    "upstream %s failed: %s",
                    server,
                    exc or type(exc).__name__,
                )
        raise UpstreamFailed(str(last))

    async def _udp(self, msg: bytes, server: Endpoint) -> bytes:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if server.family_v6 else socket.AF_INET
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _UdpExchange(msg), remote_addr=(server.host, server.port), family=family
        )
        try:
            transport.sendto(msg)
            return await asyncio.wait_for(proto.done, self.settings.timeout)
        finally:
            transport.close()

    async def _tcp(self, msg: bytes, server: Endpoint) -> bytes:
        async def exchange() -> bytes:
            reader, writer = await asyncio.open_connection(server.host, server.port)
            try:
                writer.write(struct.pack("!H", len(msg)) + msg)
                await writer.drain()
                while True:
                    (size,) = struct.unpack("!H", await reader.readexactly(2))
                    reply = await reader.readexactly(size)
                    if _matches(reply, msg):
                        return reply
            finally:
                writer.close()

        return await asyncio.wait_for(exchange(), self.settings.timeout)


def build_query(name: str, qtype: int, udp_size: int = 1232) -> bytes:
    """A recursive query for (name, IN, qtype) with EDNS, for the resolver's own lookups."""
    header = struct.pack("!HHHHHH", 0, 0x0100, 1, 0, 0, 1)
    opt = b"\x00\x00\x29" + struct.pack("!HBBHH", udp_size, 0, 0, 0, 0)
    return header + encode_name(name) + struct.pack("!HH", qtype, 1) + opt
