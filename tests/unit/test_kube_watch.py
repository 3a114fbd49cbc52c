"""The watch loop against scripted API responses: list, watch, bookmarks, 410 relist without
flapping, errors with backoff that keep the last state, RBAC hints, an absent CRD."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from interceptor.dns import wire
from interceptor.model.servicemap import ServiceMap
from interceptor.settings import ZoneSettings
from interceptor.sources.kube import ApiError, Resource, ResourceWatcher, SyncState

SVC_PATH = "/api/v1/services"


def svc(name: str, ip: str, rv: str = "1") -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": "ns", "resourceVersion": rv},
        "spec": {"clusterIP": ip},
    }


def key(name: str) -> bytes:
    return wire.encode_name(f"{name}.ns.svc.cluster.local") + b"\x00\x01"


class Script:
    """Each call to list/watch takes the next step; a step is a value or an exception."""

    def __init__(self, lists: list[Any], watches: list[Any]) -> None:
        self.lists = lists
        self.watches = watches
        self.calls: list[tuple[str, str, dict[str, str]]] = []

    def list(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        self.calls.append(("list", path, dict(params)))
        if params.get("limit") == "1":
            return {"items": []}  # the path probe
        step = self.lists.pop(0)
        if isinstance(step, Exception):
            raise step
        return step  # type: ignore[no-any-return]

    def watch(self, path: str, params: Mapping[str, str]) -> Iterator[dict[str, Any]]:
        self.calls.append(("watch", path, dict(params)))
        step = self.watches.pop(0)
        if isinstance(step, Exception):
            raise step
        yield from step


def run(
    script: Script,
    smap: ServiceMap,
    resource: Resource | None = None,
    on_apply: Callable[[ServiceMap], None] | None = None,
) -> tuple[SyncState, list[float]]:
    """Run the watcher until the script is used up; applies run inline."""
    state = SyncState(required={"Service"})
    sleeps: list[float] = []
    res = resource or Resource("Service", (SVC_PATH,))

    def record_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) > 20:  # a broken loop must fail the test, not hang it
            w.stopped.set()

    def apply(fn: Callable[[], None]) -> None:
        fn()
        if on_apply is not None:
            on_apply(smap)

    w = ResourceWatcher(script, res, smap, state, apply, sleep=record_sleep)  # type: ignore[arg-type]

    def stop_when_done() -> None:
        if not script.lists and not script.watches:
            w.stopped.set()

    original = script.watch

    def watch(path: str, params: Mapping[str, str]) -> Iterator[dict[str, Any]]:
        yield from original(path, params)
        stop_when_done()

    script.watch = watch  # type: ignore[method-assign]
    w.run()
    return state, sleeps


def test_list_then_watch_events_and_bookmark() -> None:
    smap = ServiceMap(ZoneSettings())
    script = Script(
        lists=[{"metadata": {"resourceVersion": "10"}, "items": [svc("a", "10.0.0.1")]}],
        watches=[
            [
                {"type": "ADDED", "object": svc("b", "10.0.0.2", "11")},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "15"}}},
                {"type": "MODIFIED", "object": svc("a", "10.0.0.9", "16")},
                {"type": "DELETED", "object": svc("b", "10.0.0.2", "17")},
                {"type": "SURPRISE", "object": {}},
            ],
            [],
        ],
    )
    state, _ = run(script, smap)
    assert state.ready and state.events == 3
    assert key("a") in smap.answers and key("b") not in smap.answers
    assert smap.answers[key("a")].body.endswith(bytes([10, 0, 0, 9]))
    watches = [c for c in script.calls if c[0] == "watch"]
    assert watches[0][2]["resourceVersion"] == "10"
    assert watches[0][2]["allowWatchBookmarks"] == "true"
    assert watches[1][2]["resourceVersion"] == "17"  # resumes after the last event seen


def test_a_list_is_read_a_page_at_a_time_and_applied_whole() -> None:
    """Pages of 500 (client-go's reflector's size); the map changes once, with every page,
    and the watch starts at the snapshot's resourceVersion.  An expired continue token is a
    410: the list starts over."""
    smap = ServiceMap(ZoneSettings())
    applied: list[int] = []
    script = Script(
        lists=[
            {
                "metadata": {"resourceVersion": "7", "continue": "c1"},
                "items": [svc("a", "10.0.0.1")],
            },
            ApiError(410, "continue token expired"),
            {
                "metadata": {"resourceVersion": "9", "continue": "c2"},
                "items": [svc("a", "10.0.0.1")],
            },
            {"metadata": {"resourceVersion": "9"}, "items": [svc("b", "10.0.0.2")]},
        ],
        watches=[[]],
    )
    run(script, smap, on_apply=lambda m: applied.append(len(m.answers)))
    lists = [c[2] for c in script.calls if c[0] == "list" and c[2].get("limit") != "1"]
    assert [p.get("continue") for p in lists] == [None, "c1", None, "c2"]
    assert all(p["limit"] == "500" for p in lists)
    assert key("a") in smap.answers and key("b") in smap.answers
    assert applied[0] == len(smap.answers), "applied before the last page"
    watch = next(c for c in script.calls if c[0] == "watch")
    assert watch[2]["resourceVersion"] == "9"


def test_410_relists_quietly_without_flapping() -> None:
    smap = ServiceMap(ZoneSettings())
    seen_missing: list[bool] = []
    script = Script(
        lists=[
            {"metadata": {"resourceVersion": "10"}, "items": [svc("a", "10.0.0.1")]},
            # After compaction: "a" still exists, "c" appeared while we were away.
            {
                "metadata": {"resourceVersion": "50"},
                "items": [svc("a", "10.0.0.1"), svc("c", "10.0.0.3")],
            },
        ],
        watches=[[{"type": "ERROR", "object": {"code": 410, "message": "too old"}}], []],
    )
    state, sleeps = run(
        script, smap, on_apply=lambda m: seen_missing.append(key("a") not in m.answers)
    )
    assert not any(seen_missing[1:]), "a still-existing service vanished during the relist"
    assert key("c") in smap.answers
    assert sleeps == [] and state.relists == 2 and state.errors == 0


def test_api_server_gone_keeps_state_backs_off_and_resumes_the_watch() -> None:
    smap = ServiceMap(ZoneSettings())
    script = Script(
        lists=[
            ConnectionRefusedError("refused"),
            ConnectionRefusedError("refused"),
            {"metadata": {"resourceVersion": "7"}, "items": [svc("a", "10.0.0.1")]},
        ],
        watches=[
            [{"type": "ADDED", "object": svc("b", "10.0.0.2", "8")}],
            ConnectionResetError("reset"),
            [],
        ],
    )
    state, sleeps = run(script, smap)
    assert key("a") in smap.answers and key("b") in smap.answers  # never emptied
    assert len(sleeps) == 3 and sleeps[0] <= 0.5 and sleeps[1] <= 1.0 and sleeps[2] <= 2.0
    assert sleeps[1] > sleeps[0] * 0.99 / 2  # grows (with jitter in [0.5, 1] x)
    assert state.errors == 3 and state.connected["Service"]
    # The dropped watch resumed from the last resourceVersion: no second list.
    assert state.relists == 1
    watches = [c[2]["resourceVersion"] for c in script.calls if c[0] == "watch"]
    assert watches == ["7", "8", "8"]


def test_forbidden_is_reported_with_an_rbac_hint(caplog: pytest.LogCaptureFixture) -> None:
    smap = ServiceMap(ZoneSettings())
    script = Script(
        lists=[
            ApiError(403, 'services is forbidden: User "x" cannot list'),
            {"metadata": {"resourceVersion": "1"}, "items": []},
        ],
        watches=[[]],
    )
    state, sleeps = run(script, smap)
    assert (
        "RBAC: the agent's ServiceAccount needs list and watch on /api/v1/services" in caplog.text
    )
    assert len(sleeps) == 1 and state.ready


def test_absent_crd_is_ready_and_falls_back_to_v1beta1() -> None:
    smap = ServiceMap(ZoneSettings())

    class NoCrd(Script):
        def list(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
            self.calls.append(("list", path, dict(params)))
            raise ApiError(404, "not found")

    script = NoCrd([], [])
    state = SyncState(required={"ServiceEntry"})
    sleeps: list[float] = []
    res = Resource(
        "ServiceEntry",
        ("/apis/x/v1/serviceentries", "/apis/x/v1beta1/serviceentries"),
        optional=True,
    )
    w = ResourceWatcher(
        script,
        res,
        smap,
        state,
        lambda fn: fn(),
        sleep=lambda s: (sleeps.append(s), w.stopped.set()),
    )
    w.run()
    assert state.ready and sleeps == [60.0]
    assert [c[1] for c in script.calls] == [
        "/apis/x/v1/serviceentries",
        "/apis/x/v1beta1/serviceentries",
    ]


def test_bad_object_in_watch_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    smap = ServiceMap(ZoneSettings())
    bad = {
        "metadata": {"name": "bad", "namespace": "ns", "resourceVersion": "3"},
        "spec": {"clusterIP": "not-an-ip"},
    }
    script = Script(
        lists=[{"metadata": {"resourceVersion": "1"}, "items": []}],
        watches=[
            [
                {"type": "ADDED", "object": bad},
                {"type": "ADDED", "object": svc("ok", "10.0.0.5", "4")},
            ]
        ],
    )
    run(script, smap)
    assert key("ok") in smap.answers
    assert "Service ns/bad: field spec.clusterIPs" in caplog.text


def test_the_client_api_sends_the_token_and_reads_json_without_the_clients_models(
    tmp_path: Path,
) -> None:
    """ClientApi against a local HTTP server, in a fresh interpreter: the kubeconfig's bearer
    token and the query parameters arrive, the JSON comes back, and the client's generated
    models (about 20 MiB) were never imported."""
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen: list[tuple[str, str | None]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen.append((self.path, self.headers.get("Authorization")))
            body = b'{"kind": "ServiceList", "items": [], "metadata": {"resourceVersion": "5"}}'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kc"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: t\n"
        f"clusters: [{{name: t, cluster: {{server: 'http://127.0.0.1:{server.server_port}'}}}}]\n"
        "users: [{name: t, user: {token: s3cret}}]\n"
        "contexts: [{name: t, context: {cluster: t, user: t}}]\n"
    )
    script = (
        "import sys, json\n"
        "from pathlib import Path\n"
        "from interceptor.sources.kube import ClientApi\n"
        "api = ClientApi(Path(sys.argv[1]))\n"
        "out = api.list('/api/v1/services', {'limit': '500', 'continue': 'a b&c'})\n"
        "print(json.dumps([out['metadata']['resourceVersion'],\n"
        "    sorted(m for m in sys.modules if m.startswith('kubernetes.client.models'))[:3]]))\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", script, str(kubeconfig)],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    finally:
        server.shutdown()
    version, models = json.loads(done.stdout.strip().splitlines()[-1])
    assert version == "5" and models == []
    assert seen == [("/api/v1/services?limit=500&continue=a+b%26c", "Bearer s3cret")]
