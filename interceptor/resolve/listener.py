"""asyncio UDP and TCP listeners.  Socket plumbing only: every decision is the resolver's.

UDP does not use asyncio's datagram transport: a reader callback drains the socket in a
loop (up to a batch) so that one epoll wake-up serves many queries under load, and hot
answers are sent inline without creating a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
from collections import Counter
from dataclasses import dataclass
from time import perf_counter_ns

from interceptor.errors import InterceptorError
from interceptor.logutil import RateLimitedLog
from interceptor.resolve import batchio
from interceptor.resolve.batchio import DatagramBatch
from interceptor.resolve.fair import FairScheduler
from interceptor.resolve.resolver import Resolver
from interceptor.settings import Endpoint, ServerSettings

log = logging.getLogger(__name__)
_rl = RateLimitedLog(log)

UDP_BATCH = 64
UDP_ROUNDS = 4
# A query never needs more; a bigger datagram is cut and then answered FORMERR.  Smaller than
# 64 KiB so that every receive does not allocate a large buffer.
UDP_MAX_QUERY = 4096
UDP_RCVBUF = 4 << 20


class ListenError(InterceptorError):
    """cannot listen."""


def bind_socket(ep: Endpoint, kind: int) -> socket.socket:
    family = socket.AF_INET6 if ep.family_v6 else socket.AF_INET
    sock = socket.socket(family, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if kind == socket.SOCK_DGRAM:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_RCVBUF)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((ep.host, ep.port))
    except OSError as exc:
        sock.close()
        raise ListenError(
            f"{ep} ({'UDP' if kind == socket.SOCK_DGRAM else 'TCP'}): {exc.strerror}"
        ) from exc
    sock.setblocking(False)
    return sock


class UdpServer:
    def __init__(
        self, resolver: Resolver, sock: socket.socket, fair: FairScheduler | None = None
    ) -> None:
        self.resolver = resolver
        self.sock = sock
        self.fair = fair if fair is not None else FairScheduler()
        """Careful-path queries run in a fair order between clients, with a cap each."""
        self.batch = DatagramBatch(sock, UDP_BATCH, UDP_MAX_QUERY) if batchio.available() else None
        """Datagrams by the batch (recvmmsg/sendmmsg); None: one by one (recvfrom/sendto)."""

    def start(self) -> None:
        reader = self._readable_batch if self.batch is not None else self._readable
        asyncio.get_running_loop().add_reader(self.sock.fileno(), reader)

    def _readable_batch(self) -> None:
        batch = self.batch
        assert batch is not None
        # A full batch means more are waiting: take up to UDP_ROUNDS batches per wake-up
        # before the loop polls again (each poll is a system call of its own).
        for _ in range(UDP_ROUNDS):
            t0 = perf_counter_ns()
            try:
                n = batch.receive()
            except OSError as exc:  # e.g. ICMP errors surfacing on the socket
                _rl.warning("udp-recv", "UDP receive error: %s", exc)
                return
            if not n:
                return
            queued, missed, big = batch.answer(n, self.resolver.fast)
            if queued:
                _, lost = batch.flush()
                if lost:
                    _rl.warning("udp-send-full", "UDP send failed: %d replies dropped", lost)
            for reply, addr in big:
                self._send(reply, addr)
            answered = queued + len(big)
            if answered:
                self.resolver.fast_batch(answered, perf_counter_ns() - t0, n)
            for data, addr in missed:
                self.fair.submit(addr[0], functools.partial(self._slow, data, addr))
            if n < batch.size:
                return

    def _readable(self) -> None:
        sock = self.sock
        fast = self.resolver.fast
        # One clock reading per batch, not per answer: hot-path answers are timed as the
        # batch's time over its queries (the resolver turns that into its histogram).
        t0 = perf_counter_ns()
        seen = answered = 0
        try:
            for _ in range(UDP_BATCH):
                try:
                    data, addr = sock.recvfrom(UDP_MAX_QUERY)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError as exc:  # e.g. ICMP errors surfacing on the socket
                    _rl.warning("udp-recv", "UDP receive error: %s", exc)
                    return
                seen += 1
                reply = fast(data, addr)
                if reply is not None:
                    self._send(reply, addr)
                    answered += 1
                    continue
                self.fair.submit(addr[0], functools.partial(self._slow, data, addr))
        finally:
            if answered:
                self.resolver.fast_batch(answered, perf_counter_ns() - t0, seen)

    async def _slow(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            reply = await self.resolver.resolve(data, tcp=False, client=addr)
        except Exception:  # a bug must cost one query, never the server
            log.exception("internal error answering a UDP query")
            return
        if reply is not None:
            self._send(reply, addr)

    def _send(self, reply: bytes, addr: tuple[str, int]) -> None:
        try:
            self.sock.sendto(reply, addr)
        except (BlockingIOError, InterruptedError):
            _rl.warning("udp-send-full", "UDP send buffer full: reply dropped")
        except OSError as exc:
            _rl.warning("udp-send", "UDP send to %s failed: %s", addr[0], exc)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.fair.close()
        self.sock.close()


@dataclass
class _Conn:
    client: str
    writer: asyncio.StreamWriter
    last: float
    """When the connection last carried a query (loop time)."""
    evicted: bool = False
    """Closed to make room: no longer counted, though its task may not have ended yet."""


class TcpServer:
    """RFC 7766: two-byte length framing, several (pipelined) queries per connection,
    answered as they complete, with idle timeout and connection limits.

    The limits are shared fairly: one client holds at most ``tcp_client_connections``; at
    the global limit a client with fewer connections than the busiest one takes that
    client's idlest connection; and as the limit nears, idle connections are closed sooner
    (RFC 7766 section 6.2.3 lets a server under load shorten its idle timeout)."""

    def __init__(
        self,
        resolver: Resolver,
        sock: socket.socket,
        settings: ServerSettings,
        fair: FairScheduler | None = None,
    ) -> None:
        self.resolver = resolver
        self.sock = sock
        self.settings = settings
        self.fair = fair if fair is not None else FairScheduler()
        """The same fair order as UDP's (shared with it): one client's queries, over any
        number of connections, wait their turn."""
        self.connections: dict[asyncio.Task[None], _Conn] = {}
        self.per_client: Counter[str] = Counter()
        """Live (not evicted) connections per client."""
        self.live = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, sock=self.sock, backlog=1024)

    def idle_timeout(self) -> float:
        """The idle timeout, shortened once more than half the connections are in use."""
        load = self.live / self.settings.tcp_max_connections
        full = self.settings.tcp_idle_timeout
        return full if load <= 0.5 else max(0.5, full * 2 * (1 - load))

    def _admit(self, client: str) -> bool:
        """Whether a new connection from ``client`` may stay (making room if it is fair)."""
        s = self.settings
        stats = self.resolver.stats
        if self.per_client[client] >= s.tcp_client_connections:
            stats.tcp_refusal("client_limit")
            _rl.warning("tcp-client-limit", "TCP: %s holds %d connections: closing a new one",
                        client, self.per_client[client])  # fmt: skip
            return False
        if self.live < s.tcp_max_connections:
            return True
        busiest, held = self.per_client.most_common(1)[0]
        if held <= self.per_client[client] + 1:
            stats.tcp_refusal("limit")
            _rl.warning("tcp-limit", "TCP connection limit (%d) reached: closing a new one",
                        s.tcp_max_connections)  # fmt: skip
            return False
        idlest = min((c for c in self.connections.values()
                      if c.client == busiest and not c.evicted),
                     key=lambda c: c.last)  # fmt: skip
        idlest.evicted = True
        self._release(busiest)
        idlest.writer.close()  # its task ends
        stats.tcp_refusal("evicted")
        return True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = str(peer[0]) if peer else "?"
        if not self._admit(client):
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        me = self.connections[task] = _Conn(client, writer, asyncio.get_running_loop().time())
        self.per_client[client] += 1
        self.live += 1
        try:
            await self._serve(reader, writer, me, (peer[0], peer[1]) if peer else None)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("internal error on a TCP connection")
        finally:
            del self.connections[task]
            if not me.evicted:
                self._release(client)
            writer.close()

    def _release(self, client: str) -> None:
        self.live -= 1
        self.per_client[client] -= 1
        if not self.per_client[client]:
            del self.per_client[client]

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        me: _Conn,
        client: tuple[str, int] | None,
    ) -> None:
        inflight = asyncio.Semaphore(self.settings.tcp_max_inflight)
        lock = asyncio.Lock()
        pending = 0
        settled = asyncio.Event()
        settled.set()

        def finished() -> None:
            nonlocal pending
            inflight.release()
            pending -= 1
            if not pending:
                settled.set()

        async def answer(data: bytes) -> None:
            try:
                if writer.is_closing():
                    return  # the connection went while this query waited its turn
                reply = await self.resolver.resolve(data, tcp=True, client=client)
                if reply is not None:
                    async with lock:
                        writer.write(struct.pack("!H", len(reply)) + reply)
                        await writer.drain()
            except (ConnectionError, RuntimeError):
                pass
            except Exception:
                log.exception("internal error answering a TCP query")
            finally:
                finished()

        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), self.idle_timeout())
                (size,) = struct.unpack("!H", head)
                data = await asyncio.wait_for(reader.readexactly(size), self.idle_timeout())
                me.last = asyncio.get_running_loop().time()
                await inflight.acquire()
                pending += 1
                settled.clear()
                if not self.fair.submit(me.client, functools.partial(answer, data), finished):
                    finished()
        except asyncio.IncompleteReadError:
            # The client closed (or half-closed) its side: finish what it asked first.
            if pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(settled.wait(), self.settings.tcp_idle_timeout)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self.connections):
            task.cancel()
        if self.connections:
            await asyncio.wait(list(self.connections), timeout=1)


class DnsServer:
    """UDP and TCP on the same address."""

    def __init__(self, resolver: Resolver, settings: ServerSettings) -> None:
        self.resolver = resolver
        self.settings = settings
        self.udp: UdpServer | None = None
        self.tcp: TcpServer | None = None

    async def start(self) -> None:
        udp_sock, tcp_sock = self._bind_pair(self.settings.listen)
        s = self.settings
        fair = FairScheduler(
            per_client=s.client_inflight,
            queued=s.client_queue,
            on_drop=self.resolver.stats.client_drop,
        )
        self.udp = UdpServer(self.resolver, udp_sock, fair)
        self.udp.start()
        self.tcp = TcpServer(self.resolver, tcp_sock, self.settings, fair)
        await self.tcp.start()

    @staticmethod
    def _bind_pair(ep: Endpoint, tries: int = 20) -> tuple[socket.socket, socket.socket]:
        """UDP and TCP sockets on the same port.  With port 0 the kernel picks the UDP port,
        which TCP may already use: then try another one."""
        for _ in range(tries):
            udp_sock = bind_socket(ep, socket.SOCK_DGRAM)
            try:
                tcp_sock = bind_socket(
                    Endpoint(ep.host, udp_sock.getsockname()[1]), socket.SOCK_STREAM
                )
            except ListenError:
                udp_sock.close()
                if ep.port != 0:
                    raise
                continue
            return udp_sock, tcp_sock
        raise ListenError(f"{ep}: no port free for both UDP and TCP after {tries} tries")

    @property
    def address(self) -> tuple[str, int]:
        assert self.udp is not None
        host, port = self.udp.sock.getsockname()[:2]
        return host, port

    async def close(self) -> None:
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            await self.tcp.close()
