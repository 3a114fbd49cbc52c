"""``/healthz`` and ``/readyz`` for the DaemonSet's probes, on a small asyncio HTTP server.

* ``/healthz``: the process is alive and its resolver answers: a real DNS query for
  ``dns-version.<zone>`` TXT to its own listener, over UDP, with a short timeout (any reply
  counts, even SERVFAIL before the first sync: the resolver is answering).
* ``/readyz``: the service map has had its first full sync (and, for the agent, the
  programs are attached).  While the API server is unreachable the answers keep coming from
  the last known state; readiness stays up (pods must keep resolving) and says so in its
  body, so an operator sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import struct
import time
from collections.abc import Awaitable, Callable

from interceptor.dns import wire
from interceptor.dns.codes import rcode_text
from interceptor.dns.message import build_query
from interceptor.settings import Endpoint

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str] | Awaitable[tuple[bool, str]]]
"""() -> (ok, one line saying why), or a coroutine of it."""

SELF_QUERY_TIMEOUT = 1.0


class _Reply(asyncio.DatagramProtocol):
    def __init__(self, query_id: int) -> None:
        self.query_id = query_id
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: object) -> None:
        if len(data) >= 12 and struct.unpack_from("!H", data)[0] == self.query_id:
            if not self.done.done():
                self.done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable: nothing listens, say so now rather than after the timeout.
        if not self.done.done():
            self.done.set_exception(exc)


async def self_query(
    where: Endpoint, zone: str, timeout: float = SELF_QUERY_TIMEOUT
) -> tuple[bool, str]:
    """Ask our own resolver ``dns-version.<zone>`` TXT: the liveness of the thing that
    matters, through the same socket and code as a pod's query."""
    host = where.host
    if host in ("0.0.0.0", "::"):  # bound to every address: ask over loopback
        host = "::1" if host == "::" else "127.0.0.1"
    qid = secrets.randbelow(0x10000)
    data = build_query(f"dns-version.{zone}", wire.TXT, udp_size=None, qid=qid)
    loop = asyncio.get_running_loop()
    t0 = time.monotonic()
    try:
        transport, proto = await loop.create_datagram_endpoint(
            lambda: _Reply(qid), remote_addr=(host, where.port)
        )
    except OSError as exc:
        return False, f"self-query to {Endpoint(host, where.port)} failed: {exc.strerror}"
    try:
        transport.sendto(data)
        reply = await asyncio.wait_for(proto.done, timeout)
    except TimeoutError:
        return False, (
            f"resolver at {Endpoint(host, where.port)} did not answer dns-version.{zone} TXT "
            f"within {timeout:g}s"
        )
    except OSError as exc:
        return False, f"self-query to {Endpoint(host, where.port)} failed: {exc.strerror}"
    finally:
        transport.close()
    rcode = struct.unpack_from("!H", reply, 2)[0] & 0xF
    return True, (
        f"ok: resolver answered dns-version.{zone} TXT ({rcode_text(rcode)}) in "
        f"{(time.monotonic() - t0) * 1000:.1f} ms"
    )


class HealthServer:
    def __init__(self, listen: Endpoint, ready: Check, alive: Check | None = None) -> None:
        self.listen = listen
        self.checks = {"/readyz": ready, "/healthz": alive or (lambda: (True, "ok"))}
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.listen.host, self.listen.port)
        log.info("health endpoints on http://%s/healthz and /readyz", self.listen)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            parts = line.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) > 1 else ""
            check = self.checks.get(path)
            if check is None:
                status, body = "404 Not Found", "not found"
            else:
                result = check()
                if inspect.isawaitable(result):
                    result = await result
                ok, why = result
                status, body = ("200 OK" if ok else "503 Service Unavailable"), why
            data = body.encode() + b"\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (OSError, TimeoutError, UnicodeError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
