"""The local admin endpoint: a Unix socket (mode 0600, root only) on which the running agent
answers ``services`` and ``query`` for the inspection CLI.

One JSON object per line each way; the connection closes after the reply::

    -> {"op": "query", "name": "svc1.ns1.svc.cluster.local", "type": "A", "from": "10.244.1.10"}
    <- {"ok": true, "result": {"answer": {...}, "explanation": {...}}}
    <- {"ok": false, "error": "unknown query type 'AX'"}

Why a Unix socket and not HTTP on the health port: the answers name every service and pod,
and a ``query`` makes the agent forward a name upstream; the file mode and the peer's
credentials (SO_PEERCRED) keep that to root on the node, with nothing to configure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from interceptor.dns import wire
from interceptor.dns.codes import type_code, type_text
from interceptor.dns.message import build_query
from interceptor.errors import InterceptorError
from interceptor.ops.explain import for_client, reply_to_json, services
from interceptor.resolve.resolver import Resolver

log = logging.getLogger(__name__)

MAX_REQUEST = 64 * 1024
QUERY_TIMEOUT = 15.0


class AdminError(InterceptorError):
    """the agent could not answer."""


class AdminUnavailable(AdminError):
    """cannot reach the running agent."""


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class AdminServer:
    def __init__(
        self, path: Path, resolver: Resolver, status: Callable[[], dict[str, Any]]
    ) -> None:
        self.path = path
        self.resolver = resolver
        self.status = status
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The socket file takes the umask's mode at bind(); a tight umask for that one call
        # means it is never, even briefly, connectable by others.
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            raise AdminError(f"cannot listen on {self.path}: {exc.strerror}") from exc
        finally:
            os.umask(old)
        self.server = await asyncio.start_unix_server(self._handle, sock=sock, limit=MAX_REQUEST)
        log.info("admin endpoint on %s (root only)", self.path)

    def _clear_stale(self) -> None:
        """A socket file left by a killed agent is removed; a live one is not ours to take."""
        try:
            mode = self.path.lstat().st_mode
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(mode):
            raise AdminError(f"{self.path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(self.path))
        except OSError:
            self.path.unlink(missing_ok=True)
            return
        finally:
            probe.close()
        raise AdminError(f"another process already serves {self.path}")

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
            self.server = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            uid = _peer_uid(sock) if sock is not None else None
            if uid not in (0, os.geteuid()):
                reply: dict[str, Any] = {"ok": False, "error": "permission denied"}
            else:
                try:
                    line = await asyncio.wait_for(reader.readline(), 5)
                    reply = {"ok": True, "result": await self.dispatch(json.loads(line))}
                except AdminError as exc:
                    reply = {"ok": False, "error": exc.detail}
                except (ValueError, KeyError, TypeError) as exc:
                    reply = {"ok": False, "error": f"bad request: {exc}"}
                except TimeoutError:
                    reply = {"ok": False, "error": "timed out"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            pass
        except Exception:  # one bad request must not take the endpoint down
            log.exception("admin request failed")
        finally:
            writer.close()

    async def dispatch(self, req: Any) -> Any:
        if not isinstance(req, dict):
            raise AdminError("a request is a JSON object")
        op = req.get("op")
        if op == "status":
            return self.status()
        if op == "services":
            name = req.get("name")
            return services(self.resolver.smap, str(name) if name else None)
        if op == "query":
            return await self.query(req)
        raise AdminError(f"unknown op {op!r} (status, services, query)")

    async def query(self, req: dict[str, Any]) -> dict[str, Any]:
        name = str(req.get("name") or "").strip()
        if not name:
            raise AdminError("query needs a name")
        try:
            wire.encode_name(name)
        except (wire.NameError_, UnicodeError) as exc:
            raise AdminError(f"{name!r} is not a valid domain name") from exc
        try:
            qtype = type_code(str(req.get("type") or "A"))
        except ValueError as exc:
            raise AdminError(str(exc)) from exc
        source = req.get("from")
        client = None
        if source:
            try:
                client = (str(ipaddress.ip_address(str(source))), 0)
            except ValueError as exc:
                raise AdminError(f"--from {source!r} is not an IP address") from exc
        resolver = self.resolver
        data = build_query(name.rstrip("."), qtype)
        t0 = time.monotonic()
        decision = await asyncio.wait_for(resolver.decide(data, False, client), QUERY_TIMEOUT)
        elapsed = time.monotonic() - t0
        if decision.reply is None:
            raise AdminError("the resolver dropped the query")
        answer = reply_to_json(decision.reply)
        why = for_client(resolver, decision, name, qtype, client)
        return {
            "question": {
                "name": name,
                "type": type_text(qtype),
                "from": client[0] if client else None,
            },
            "answer": answer,
            "explanation": why.to_json(),
            "elapsed_ms": round(elapsed * 1000, 3),
        }


def request(path: Path, req: dict[str, Any], timeout: float = QUERY_TIMEOUT + 5) -> Any:
    """One request to the agent's admin socket; the result, or AdminError with its message."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise AdminUnavailable(
                f"no admin socket at {path}: is the agent running? (--state-dir, --admin-socket)"
            ) from None
        except ConnectionRefusedError:
            raise AdminUnavailable(f"{path}: nobody listening (the agent is not running)") from None
        except PermissionError:
            raise AdminUnavailable(
                f"{path}: permission denied (the admin socket is root only)"
            ) from None
        sock.sendall(json.dumps(req).encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        raise AdminUnavailable(f"{path}: no reply within {timeout:.0f}s") from None
    except OSError as exc:
        raise AdminUnavailable(f"{path}: {exc.strerror or exc}") from exc
    finally:
        sock.close()
    try:
        reply = json.loads(b"".join(chunks))
    except ValueError:
        raise AdminError(f"{path}: the agent sent no valid reply") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise AdminError(str(reply.get("error") if isinstance(reply, dict) else reply))
    return reply.get("result")
