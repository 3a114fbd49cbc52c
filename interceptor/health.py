"""``/healthz`` and ``/readyz`` for the DaemonSet's probes, on a small asyncio HTTP server.

* ``/healthz``: the process is alive and its event loop answers.
* ``/readyz``: the service map has had its first full sync (and, for the agent, the
  programs are attached).  While the API server is unreachable the answers keep coming from
  the last known state; readiness stays up (pods must keep resolving) and says so in its
  body, so an operator sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from interceptor.settings import Endpoint

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]
"""() -> (ok, one line saying why)."""


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
                ok, why = check()
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
