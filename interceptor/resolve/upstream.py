"""Forwarding to upstream servers: UDP first, TCP when the answer is truncated, or TCP only
(``--force-tcp``) over persistent, pipelined connections.

Every UDP attempt uses a fresh random transaction ID and a fresh socket (so a fresh random
source port from the kernel), and a reply is only accepted when it comes from the server
asked (the socket is connected), carries our ID, is a response, and repeats our question
(RFC 5452 section 9.1).  Anything else is ignored and the attempt keeps waiting.

TCP goes through a small pool of connections per server (:class:`TcpPool`): queries are
pipelined on them with IDs unique per connection, and replies are matched by ID in whatever
order they arrive (RFC 7766 sections 6.2.1.1 and 7), with the same question check as UDP.
Idle connections are closed; a connection the server closed under a query is replaced once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from interceptor.dns.message import question_end
from interceptor.logutil import RateLimitedLog
from interceptor.settings import Endpoint, UpstreamSettings
from interceptor.telemetry.stats import MAX_UPSTREAM_LABELS, UpstreamStats

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log)

TCP_POOL_SIZE = 4
"""Connections per upstream at most: a few, so one slow reply does not hold up the rest
(head-of-line blocking) and a burst spreads, without a connection per query."""
TCP_PIPELINE = 32
"""Queries in flight on one connection before another connection is opened."""
TCP_IDLE = 10.0
"""Seconds a pooled connection may carry nothing before we close it (RFC 7766 section 6.2.3
leaves the value to the client; CoreDNS's forward plugin also expires after 10 s)."""


class UpstreamFailed(Exception):
    """No upstream gave a usable answer in time."""


class Upstream(Protocol):
    """What the resolver needs of a forwarder: the reply to one query from the first of
    ``servers`` that gives a usable one.  :class:`Forwarder` is the real one; tests hand
    the resolver their own."""

    stats: UpstreamStats

    async def forward(self, query: bytes, servers: Sequence[Endpoint]) -> bytes:
        """The reply (its ID is ours, not the client's); UpstreamFailed if none came."""
        ...

    def healthy(self) -> dict[str, bool]: ...

    def close(self) -> None: ...


def _matches(reply: bytes, query: bytes) -> bool:
    """Same ID, QR set, and the same question (names compared case-insensitively)."""
    if len(reply) < 12 or reply[:2] != query[:2] or not reply[2] & 0x80:
        return False
    try:
        end = question_end(query)
    except (ValueError, IndexError):
        return False
    if reply[4:6] != b"\x00\x01":
        # A FORMERR/NOTIMP may legitimately carry no question.
        return reply[4:6] == b"\x00\x00" and reply[3] & 0x0F in (1, 4)
    return reply[12:end].lower() == query[12:end].lower()


def _spoof_warning() -> None:
    _rl.warning(
        "upstream-mismatch",
        "ignored a reply that does not match its query (wrong ID or question): possible spoofing",
    )


class _UdpExchange:
    """One query on its own connected socket (a fresh random source port), read by a plain
    reader callback: no asyncio transport, whose set-up and teardown cost several loop
    callbacks per query (under a flood of misses, the loop turns they lengthen are every
    other pod's wait)."""

    def __init__(self, query: bytes, sock: socket.socket) -> None:
        self.query = query
        self.sock = sock
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def readable(self) -> None:
        while not self.done.done():
            try:
                data = self.sock.recv(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # an ICMP error surfacing (port unreachable)
                self.done.set_exception(exc)
                return
            if _matches(data, self.query):
                self.done.set_result(data)
            else:
                _spoof_warning()


class _TcpConnection:
    """One connection to an upstream carrying pipelined queries, matched to replies by ID."""

    def __init__(
        self,
        server: Endpoint,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        idle: float,
        gone: Callable[[_TcpConnection], None],
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.idle = idle
        self.gone = gone
        self.pending: dict[int, tuple[bytes, asyncio.Future[bytes]]] = {}
        self.closed = False
        self.answered = 0
        """Replies received so far: a connection that answered before may have been closed
        by the server meanwhile, so a query lost on it deserves a second connection."""
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.task = asyncio.ensure_future(self._read())
        # One timer per connection instead of a timeout around every read: cheaper per reply.
        self.timer = self.loop.call_later(idle, self._check_idle)

    def _check_idle(self) -> None:
        if self.closed:
            return
        due = self.last + self.idle
        if not self.pending and self.loop.time() >= due:
            self.close()  # idle: close it ourselves, before the server does
        else:
            self.timer = self.loop.call_later(max(0.1, due - self.loop.time()), self._check_idle)

    async def exchange(self, query: bytes) -> bytes:
        """Send ``query`` under an ID free on this connection; the matching reply."""
        if self.closed:  # the server hung up while we were waiting for it to connect
            raise ConnectionResetError(f"connection to {self.server} closed")
        qid = secrets.randbits(16)
        while qid in self.pending:
            qid = secrets.randbits(16)
        msg = qid.to_bytes(2, "big") + query[2:]
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.pending[qid] = (msg, fut)
        self.last = self.loop.time()
        try:
            self.writer.write(struct.pack("!H", len(msg)) + msg)
            await self.writer.drain()
            return await fut
        finally:
            entry = self.pending.get(qid)
            if entry is not None and entry[1] is fut:
                del self.pending[qid]  # timed out or cancelled: a late reply is dropped

    async def _read(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                (size,) = struct.unpack("!H", await self.reader.readexactly(2))
                reply = await self.reader.readexactly(size)
                self.answered += 1
                self.last = self.loop.time()
                qid = int.from_bytes(reply[:2], "big")
                entry = self.pending.get(qid) if size >= 2 else None
                if entry is None:
                    # Its query timed out (and may have been answered by another attempt).
                    log.debug("upstream %s: reply for no pending query (late)", self.server)
                    continue
                msg, fut = entry
                if not _matches(reply, msg):
                    _spoof_warning()
                    continue
                del self.pending[qid]
                if not fut.done():
                    fut.set_result(reply)
        except (OSError, asyncio.IncompleteReadError) as exc:
            error = exc
        finally:
            self._close(error)

    def _close(self, error: BaseException | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.cancel()
        self.writer.close()
        why = f"connection to {self.server} closed" + (f": {error}" if error else "")
        for _, fut in self.pending.values():
            if not fut.done():
                fut.set_exception(ConnectionResetError(why))
        self.pending.clear()
        self.gone(self)

    def close(self) -> None:
        self.task.cancel()
        self._close(None)


class TcpPool:
    """A few persistent connections to one upstream (RFC 7766 section 6.2.1: reuse and
    pipelining), opened on demand and closed when idle."""

    def __init__(
        self,
        server: Endpoint,
        stats: UpstreamStats | None = None,
        size: int = TCP_POOL_SIZE,
        pipeline: int = TCP_PIPELINE,
        idle: float = TCP_IDLE,
    ) -> None:
        self.server = server
        self.stats = stats
        self.size = size
        self.pipeline = pipeline
        self.idle = idle
        self.conns: list[_TcpConnection] = []
        self._opening: asyncio.Future[_TcpConnection] | None = None

    async def query(self, query: bytes) -> bytes:
        """The reply to ``query`` (its ID is replaced by one free on the connection used and
        restored by the caller).  Raises OSError, IncompleteReadError, ConnectionError."""
        conn = await self._connection()
        try:
            return await conn.exchange(query)
        except ConnectionError:
            if not conn.answered:
                raise
        # The server closed a connection it had served on before (its idle timeout, a
        # restart): the query never had a fair chance, so it gets one fresh connection.
        conn = await self._connection(fresh=True)
        return await conn.exchange(query)

    async def _connection(self, fresh: bool = False) -> _TcpConnection:
        live = [c for c in self.conns if not c.closed]
        best = min(live, key=lambda c: len(c.pending), default=None)
        if best is not None and not fresh:
            if len(best.pending) < self.pipeline or len(live) >= self.size:
                return best
        if self._opening is None:
            # One connect at a time, shared by everyone who needs it: a burst of 100 queries
            # on a cold pool opens one connection and pipelines on it, not 100.
            self._opening = asyncio.ensure_future(self._open())
            self._opening.add_done_callback(self._opened)
        return await asyncio.shield(self._opening)

    def _opened(self, fut: asyncio.Future[_TcpConnection]) -> None:
        self._opening = None
        if not fut.cancelled():
            fut.exception()  # retrieved: waiters get it; no "never retrieved" noise

    async def _open(self) -> _TcpConnection:
        reader, writer = await asyncio.open_connection(self.server.host, self.server.port)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _TcpConnection(self.server, reader, writer, self.idle, self._gone)
        self.conns.append(conn)
        if self.stats is not None:
            self.stats.connected(str(self.server))
        return conn

    def _gone(self, conn: _TcpConnection) -> None:
        with contextlib.suppress(ValueError):
            self.conns.remove(conn)

    def close(self) -> None:
        for conn in list(self.conns):
            conn.close()
        if self._opening is not None:
            self._opening.cancel()


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
        self,
        settings: UpstreamSettings,
        clock: Callable[[], float] = time.monotonic,
        stats: UpstreamStats | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.health: dict[Endpoint, Health] = {}
        self.stats = stats if stats is not None else UpstreamStats()
        self.pools: dict[Endpoint, TcpPool] = {}
        self.seen: dict[Endpoint, None] = {}
        """Servers asked so far (insertion-ordered, bounded), for the health gauge."""

    def order(self, servers: Sequence[Endpoint]) -> list[Endpoint]:
        """Servers that are up first (in the configured order), then the others: when all
        are down we still try, which is also how a recovered server is noticed."""
        now = self.clock()
        up = [s for s in servers if self.health.get(s, Health()).up(now)]
        return up + [s for s in servers if s not in up]

    def healthy(self) -> dict[str, bool]:
        """Every server asked so far: False while it is being skipped."""
        now = self.clock()
        return {str(s): self.health.get(s, Health()).up(now) for s in self.seen}

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
            if server not in self.seen and len(self.seen) < MAX_UPSTREAM_LABELS:
                self.seen[server] = None
            try:
                if self.settings.force_tcp:
                    reply = await self._timed(self._tcp, query, server)
                else:
                    reply = await self._timed(self._udp, query, server)
                    if reply[2] & 0x02:  # TC: ask again over TCP (RFC 7766 section 5)
                        reply = await self._timed(self._tcp, query, server)
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

    async def _timed(
        self,
        exchange: Callable[[bytes, Endpoint], Coroutine[Any, Any, bytes]],
        query: bytes,
        server: Endpoint,
    ) -> bytes:
        """One attempt within the per-attempt timeout, counted by outcome."""
        t0 = time.perf_counter()
        outcome = "error"
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the exchange in a task of its own.
            async with asyncio.timeout(self.settings.timeout):
                reply = await exchange(query, server)
            outcome = "truncated" if reply[2] & 0x02 else "ok"
            return reply
        except TimeoutError:
            outcome = "timeout"
            raise
        finally:
            self.stats.record(str(server), outcome, time.perf_counter() - t0)

    async def _udp(self, query: bytes, server: Endpoint) -> bytes:
        msg = secrets.token_bytes(2) + query[2:]
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if server.family_v6 else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
        try:
            # connect(): the kernel picks a random ephemeral port, and only the server's
            # datagrams reach the socket.
            sock.connect((server.host, server.port))
            exchange = _UdpExchange(msg, sock)
            loop.add_reader(sock.fileno(), exchange.readable)
            try:
                sock.send(msg)
                return await exchange.done
            finally:
                loop.remove_reader(sock.fileno())
        finally:
            sock.close()

    async def _tcp(self, query: bytes, server: Endpoint) -> bytes:
        pool = self.pools.get(server)
        if pool is None:
            if len(self.pools) >= MAX_UPSTREAM_LABELS:
                # Any address a pod asks may be an upstream (--capture-all): drop pools that
                # hold no connection rather than keep one per address ever seen.
                for ep in [ep for ep, p in self.pools.items() if not p.conns]:
                    del self.pools[ep]
            pool = self.pools[server] = TcpPool(server, self.stats)
        return await pool.query(query)

    def close(self) -> None:
        """Close every pooled connection."""
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()
