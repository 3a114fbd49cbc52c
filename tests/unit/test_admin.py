"""The admin socket: private, answering, and clear about bad requests."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from interceptor.errors import InterceptorError
from interceptor.ops.admin import AdminError, AdminServer, request
from interceptor.resolve.resolver import Resolver

# ----------------------------------------------------------------------------- admin socket


@pytest.fixture
def admin(resolver: Resolver, tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "admin.sock"
    loop = asyncio.new_event_loop()
    server = AdminServer(path, resolver, lambda: {"pid": os.getpid()})
    loop.run_until_complete(server.start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def test_admin_socket_is_private_and_answers(admin: Path) -> None:
    assert oct(admin.stat().st_mode & 0o777) == "0o600"
    assert request(admin, {"op": "status"}) == {"pid": os.getpid()}
    out = request(admin, {"op": "query", "name": "svc1.ns1.svc.cluster.local", "type": "A"})
    assert out["answer"]["rcode"] == "NOERROR"
    assert [r["data"] for r in out["answer"]["answer"]] == ["10.96.1.1"]
    assert out["explanation"]["rule"] == "clusterip-service"
    out = request(admin, {"op": "query", "name": "a.b.ns1.svc.cluster.local", "from": "10.0.0.1"})
    assert out["answer"]["rcode"] == "NXDOMAIN" and out["question"]["from"] == "10.0.0.1"
    assert request(admin, {"op": "services", "name": "svc1"})[0]["namespace"] == "ns1"


@pytest.mark.parametrize(
    ("req", "error"),
    [
        ({"op": "query", "name": "x.cluster.local", "type": "NOPE"}, "unknown query type"),
        ({"op": "query", "name": "a..b"}, "not a valid domain name"),
        ({"op": "query", "name": "x", "from": "not-an-ip"}, "not an IP address"),
        ({"op": "frobnicate"}, "unknown op"),
    ],
)
def test_admin_bad_requests_get_a_message(admin: Path, req: dict[str, Any], error: str) -> None:
    with pytest.raises(AdminError, match=error):
        request(admin, req)


def test_admin_garbage_and_stale_socket(admin: Path, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(admin))
        s.sendall(b"{{{\n")
        assert json.loads(s.recv(4096))["ok"] is False
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))  # bound, never listening: what a killed agent leaves
    with pytest.raises(InterceptorError, match="not running"):
        request(stale, {"op": "status"})
    with pytest.raises(InterceptorError, match="is the agent running"):
        request(tmp_path / "missing.sock", {"op": "status"})


def test_second_server_on_a_live_socket_refuses(admin: Path, resolver: Resolver) -> None:
    other = AdminServer(admin, resolver, dict)
    with pytest.raises(AdminError, match="already serves"):
        asyncio.run(other.start())
