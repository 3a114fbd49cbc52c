"""The Kubernetes API as a source: list, then watch from the returned resourceVersion with
bookmarks, for every kind the service map needs.

The loop per resource (the shape of kopf's watching.py):

* list -> ``ServiceMap.replace(objects, kinds=[kind])``: the *difference* is applied, so a
  relist never makes a still-existing service flap to NXDOMAIN;
* watch from the list's resourceVersion with ``allowWatchBookmarks``; ADDED/MODIFIED/DELETED
  go to the map one by one; BOOKMARK only advances the resourceVersion;
* ``410 Gone`` ("the resourceVersion you asked for is compacted away") -> quiet relist;
* any other failure -> exponential backoff with jitter, keeping the last known state: an API
  server that goes away never empties the map;
* unknown event types are logged and skipped.

The HTTP work runs in one thread per resource (the official client is synchronous); every
map change is handed to the event loop, which is the only writer of the service map.
Objects are decoded from raw JSON straight into the slim model types: no client model
objects are ever built (they cost ~100x the memory).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
import os
import random
import sys
import threading
import urllib.parse
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from interceptor.errors import ObjectError, SourceError
from interceptor.lightimport import bare_packages
from interceptor.model.objects import KubeObject, parse
from interceptor.model.servicemap import ServiceMap

log = logging.getLogger(__name__)

WATCH_TIMEOUT = 300  # seconds the server keeps one watch open before we re-watch
LIST_TIMEOUT = 20.0  # seconds of silence after which a list is abandoned and retried
LIST_PAGE = 500  # objects per list request
# How often an absent CRD (ServiceEntry without Istio) is looked for again.  The environment
# override exists for the e2e tests, which install the CRD after the agent started.
CRD_RECHECK = float(os.environ.get("INTERCEPTOR_CRD_RECHECK", "60"))
BACKOFF_START, BACKOFF_MAX = 0.5, 30.0


class ApiError(Exception):
    """An HTTP error from the API server, with its status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class Api(Protocol):
    """The two calls the source makes.  The real one wraps the official client; unit tests
    script one."""

    def list(self, path: str, params: Mapping[str, str]) -> dict[str, Any]: ...

    def watch(self, path: str, params: Mapping[str, str]) -> Iterator[dict[str, Any]]: ...


@dataclass(frozen=True)
class Resource:
    """One list+watch stream feeding the map."""

    kind: str
    paths: tuple[str, ...]
    """API paths to try in order (e.g. ServiceEntry v1, then v1beta1)."""
    field_selector: str = ""
    optional: bool = False
    """A CRD that may be absent: log once and keep looking for it."""


@dataclass
class SyncState:
    """What readiness and metrics need to know about the watch."""

    synced: set[str] = field(default_factory=set)
    """Kinds whose first list has been applied (or that are absent, for optional ones)."""
    required: set[str] = field(default_factory=set)
    connected: dict[str, bool] = field(default_factory=dict)
    events: int = 0
    relists: int = 0
    errors: int = 0
    last_error: str = ""
    first_sync: asyncio.Event | None = None

    @property
    def ready(self) -> bool:
        return self.required <= self.synced

    @property
    def healthy(self) -> bool:
        return all(self.connected.get(k, False) for k in self.required)


def resources(node_name: str | None, all_pods: bool) -> list[Resource]:
    pod_selector = "" if all_pods or not node_name else f"spec.nodeName={node_name}"
    return [
        Resource("Namespace", ("/api/v1/namespaces",)),
        Resource("Service", ("/api/v1/services",)),
        Resource("EndpointSlice", ("/apis/discovery.k8s.io/v1/endpointslices",)),
        Resource("Pod", ("/api/v1/pods",), field_selector=pod_selector),
        Resource(
            "ServiceEntry",
            (
                "/apis/networking.istio.io/v1/serviceentries",
                "/apis/networking.istio.io/v1beta1/serviceentries",
            ),
            optional=True,
        ),
    ]


def decode(kind: str, api_version: str, raw: Mapping[str, Any]) -> KubeObject | None:
    """A raw API object (lists omit kind/apiVersion on items) in its slim form; None and a
    log line if it does not parse."""
    obj = dict(raw)
    obj.setdefault("kind", kind)
    obj.setdefault("apiVersion", api_version)
    try:
        return parse(obj)
    except ObjectError as exc:
        log.error("skipped %s", exc)
        return None


Apply = Callable[[Callable[[], None]], None]
"""Runs a function on the event loop thread (the only writer of the map)."""


class ResourceWatcher:
    """list -> watch -> (410: relist | error: backoff) for one resource, in a thread."""

    def __init__(
        self,
        api: Api,
        resource: Resource,
        smap: ServiceMap,
        state: SyncState,
        apply: Apply,
        sleep: Callable[[float], object] | None = None,
    ) -> None:
        self.api = api
        self.resource = resource
        self.smap = smap
        self.state = state
        self.apply = apply
        self.stopped = threading.Event()
        self.sleep = sleep or self.stopped.wait
        """Waits (interruptibly, by default) between attempts; tests pass a recorder."""
        self._path: str | None = None
        self._version: str | None = None
        """resourceVersion to watch from; None means list first."""
        self._absent_logged = False

    def params(self, **extra: str) -> dict[str, str]:
        out = dict(extra)
        if self.resource.field_selector:
            out["fieldSelector"] = self.resource.field_selector
        return out

    def run(self) -> None:
        backoff = BACKOFF_START
        while not self.stopped.is_set():
            try:
                self.run_once()
                backoff = BACKOFF_START
            except ApiError as exc:
                if exc.status == 410:
                    # Compacted, or a restarted API server's watch cache starts later than
                    # our resourceVersion: relist at once; the diff keeps answers steady.
                    log.info("relisting %s: resourceVersion expired (410 Gone)", self.resource.kind)
                    self._version = None
                    continue
                if exc.status == 429:
                    # Throttled, or storage (re)initialising: the server asks for a short
                    # pause (Retry-After), not for an ever longer backoff.
                    self.sleep(1.0)
                    continue
                backoff = self._failed(exc, backoff)
            except Exception as exc:  # connection refused, reset, timeout, bad JSON
                backoff = self._failed(exc, backoff)

    def _failed(self, exc: Exception, backoff: float) -> float:
        kind = self.resource.kind
        self.state.connected[kind] = False
        self.state.errors += 1
        self.state.last_error = f"{kind}: {exc}"
        hint = ""
        if isinstance(exc, ApiError) and exc.status == 403:
            hint = (
                f" (RBAC: the agent's ServiceAccount needs list and watch on "
                f"{self._path or self.resource.paths[0]})"
            )
        log.warning(
            "watch of %s failed: %s%s; keeping the last known state, retrying in %.1fs",
            kind,
            exc,
            hint,
            backoff,
        )
        self.sleep(backoff * random.uniform(0.5, 1.0))  # jitter: nodes must not stampede
        return min(backoff * 2, BACKOFF_MAX)

    def _find_path(self) -> str | None:
        """The first API path that exists; None for an absent optional CRD."""
        for path in self.resource.paths:
            try:
                self.api.list(path, {"limit": "1"})
                return path
            except ApiError as exc:
                if exc.status != 404 or not self.resource.optional:
                    raise
        return None

    def run_once(self) -> None:
        kind = self.resource.kind
        if self._path is None:
            self._path = self._find_path()
            if self._path is None:
                if not self._absent_logged:
                    log.info(
                        "%s is not served by this API server (CRD absent): carrying on "
                        "without it, and looking again every %gs",
                        kind,
                        CRD_RECHECK,
                    )
                    self._absent_logged = True
                # Through the loop, like every other change: asyncio.Event is not
                # thread-safe, and setting it from this thread may never wake the waiter.
                self.apply(self._mark_synced)
                self.state.connected[kind] = True
                self.sleep(CRD_RECHECK)
                return
        path = self._path
        api_version = path.split("/apis/")[-1].rsplit("/", 1)[0] if "/apis/" in path else "v1"
        if self._version is None:
            # Only the first time and after 410: a dropped connection resumes the watch from
            # the last resourceVersion seen, as client-go's reflector does, sparing the API
            # server a full list from every node.
            self._version = self._list(path, api_version)
        while not self.stopped.is_set():
            params = self.params(
                watch="1",
                resourceVersion=self._version,
                allowWatchBookmarks="true",
                timeoutSeconds=str(WATCH_TIMEOUT),
            )
            for event in self.api.watch(path, params):
                if self.stopped.is_set():
                    return
                self._version = self._event(event, kind, api_version) or self._version
            self.state.connected[kind] = True

    def _list(self, path: str, api_version: str) -> str:
        """The full list, a page of :data:`LIST_PAGE` at a time (client-go's reflector pages
        at 500 too): each page is decoded to slim objects before the next is read, so a
        100,000-object list never sits in memory as JSON and dicts at once.  The pages are
        one consistent snapshot (the continue token carries it); an expired token is a 410,
        and the caller lists again from the start."""
        kind = self.resource.kind
        objects: list[KubeObject] = []
        version = ""
        token = ""
        while True:
            params = self.params(limit=str(LIST_PAGE), **({"continue": token} if token else {}))
            page = self.api.list(path, params)
            for item in page.get("items") or []:
                obj = decode(kind, api_version, item)
                if obj is not None:
                    objects.append(obj)
            meta = page.get("metadata") or {}
            version = str(meta.get("resourceVersion", "")) or version
            token = str(meta.get("continue") or "")
            del page
            if not token:
                break
        self.apply(lambda: self._replace(objects))
        self.state.relists += 1
        self.state.connected[kind] = True
        log.info("listed %d %s at resourceVersion %s", len(objects), kind, version)
        return version

    def _event(self, event: Mapping[str, Any], kind: str, api_version: str) -> str | None:
        etype = event.get("type")
        raw = event.get("object") or {}
        if etype == "ERROR":
            status = raw.get("code", 500) if isinstance(raw, Mapping) else 500
            raise ApiError(
                int(status), str(raw.get("message", raw)) if isinstance(raw, Mapping) else str(raw)
            )
        meta = raw.get("metadata") or {} if isinstance(raw, Mapping) else {}
        version = str(meta.get("resourceVersion", "")) or None
        if etype == "BOOKMARK":
            return version
        if etype not in ("ADDED", "MODIFIED", "DELETED"):
            log.warning("skipped a watch event of unknown type %r for %s", etype, kind)
            return version
        obj = decode(kind, api_version, raw)
        if obj is None:
            return version
        self.state.events += 1
        if etype == "DELETED":
            self.apply(lambda: self._delete(obj))
        else:
            self.apply(lambda: self._upsert(obj))
        return version

    def _replace(self, objects: list[KubeObject]) -> None:
        self.smap.replace(objects, kinds=[self.resource.kind])
        self._mark_synced()

    def _upsert(self, obj: KubeObject) -> None:
        self.smap.upsert(obj)

    def _delete(self, obj: KubeObject) -> None:
        self.smap.delete(obj.key)

    def _mark_synced(self) -> None:
        self.state.synced.add(self.resource.kind)
        if self.state.ready and self.state.first_sync is not None:
            self.state.first_sync.set()


class ClientApi:
    """:class:`Api` over the official client's configuration (kubeconfig or in-cluster, TLS,
    tokens and their refresh) and its urllib3 connection pool, reading raw JSON.

    Only ``kubernetes.config`` and the client's ``configuration`` and ``rest`` modules are
    used; :func:`_client_modules` imports them without the client's generated API and model
    classes, which the agent never uses and which would hold about 20 MiB for its whole life.
    """

    def __init__(self, kubeconfig: Path | None) -> None:
        config, configuration, rest = _client_modules()
        self.configuration = configuration()
        try:
            if kubeconfig is not None:
                config.load_kube_config(
                    config_file=str(kubeconfig), client_configuration=self.configuration
                )
            else:
                config.load_incluster_config(client_configuration=self.configuration)
        except (config.ConfigException, OSError) as exc:
            where = str(kubeconfig) if kubeconfig else "in-cluster (service account)"
            raise SourceError(f"Kubernetes configuration {where}: {exc}") from exc
        self.rest = rest.RESTClientObject(self.configuration)
        if self.configuration.verify_ssl:
            # urllib3 calls a request to an IP address "unverified" even though the CA is
            # checked (CERT_REQUIRED); without this, every request logs a warning.
            import urllib3

            warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)

    def _request(self, path: str, params: Mapping[str, str], timeout: float) -> Any:
        query = urllib.parse.urlencode(list(params.items()))
        url = self.configuration.host + path + (f"?{query}" if query else "")
        headers = {"Accept": "application/json", "User-Agent": USER_AGENT}
        # The bearer token as the client would send it: refreshed by the configuration's
        # hook (in-cluster: the projected token file, re-read as the kubelet rotates it).
        bearer = self.configuration.auth_settings().get("BearerToken")
        if bearer and bearer["value"]:
            headers[bearer["key"]] = bearer["value"]
        resp = self.rest.request("GET", url, headers=headers, _request_timeout=(10, timeout))
        if resp.status >= 400:
            body = resp.read()
            try:
                message = json.loads(body).get("message", "")
            except (ValueError, AttributeError):
                message = body[:200].decode(errors="replace")
            raise ApiError(resp.status, message)
        return resp

    def list(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        # A list that stalls (a proxy or an API server mid-restart) must not stall the sync
        # for good: time out and retry.
        resp = self._request(path, params, LIST_TIMEOUT)
        data: dict[str, Any] = json.loads(resp.read())
        return data

    def watch(self, path: str, params: Mapping[str, str]) -> Iterator[dict[str, Any]]:
        resp = self._request(path, params, WATCH_TIMEOUT + 30)
        buf = b""
        try:
            for chunk in resp.response.stream(65536, decode_content=True):
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)
        finally:
            resp.response.release_conn()


USER_AGENT = "dns-interceptor"


def _client_modules() -> tuple[Any, Any, Any]:
    """(``kubernetes.config``, the client's ``Configuration``, ``kubernetes.client.rest``).

    ``import kubernetes`` runs the package's ``__init__``, which imports every generated API
    and model class.  So, unless the package is imported already, it and ``kubernetes.client``
    stand as bare packages while the three are imported, and are then taken away again, so
    that a later ``import kubernetes`` gets the real package.  ``kubernetes.config`` refers to
    ``ApiClient`` (only to refresh OIDC tokens): it gets one that imports the real one when
    first made.  A client laid out otherwise falls back to the full import."""
    if "kubernetes" in sys.modules:
        return _full_client_modules()
    try:
        with bare_packages("kubernetes", "kubernetes.client") as stubs:
            client = stubs["kubernetes.client"]
            configuration = importlib.import_module("kubernetes.client.configuration").Configuration
            client.Configuration = configuration  # type: ignore[attr-defined]
            client.ApiClient = _ApiClientOnDemand  # type: ignore[attr-defined]
            rest = importlib.import_module("kubernetes.client.rest")
            config = importlib.import_module("kubernetes.config")
        return config, configuration, rest
    except Exception as exc:  # another layout: pay for the models
        log.info("importing the whole Kubernetes client (%s)", exc)
        for name in [n for n in sys.modules if n == "kubernetes" or n.startswith("kubernetes.")]:
            del sys.modules[name]
        return _full_client_modules()


def _full_client_modules() -> tuple[Any, Any, Any]:
    from kubernetes import config
    from kubernetes.client import Configuration, rest

    return config, Configuration, rest


class _ApiClientOnDemand:
    """``kubernetes.client.ApiClient`` for ``kubernetes.config``, imported when first made."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from kubernetes.client.api_client import ApiClient

        return ApiClient(*args, **kwargs)


class KubeSource:
    """All the resource watchers, started as daemon threads."""

    def __init__(
        self,
        api: Callable[[], Api],
        smap: ServiceMap,
        node_name: str | None,
        all_pods: bool,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """``api`` makes one client per resource: each watcher owns its connections, so a
        long-lived watch can never hold up another resource's list."""
        self.smap = smap
        self.state = SyncState(first_sync=asyncio.Event())
        self.loop = loop
        self.watchers: list[ResourceWatcher] = []
        for res in resources(node_name, all_pods):
            self.state.required.add(res.kind)
            self.watchers.append(ResourceWatcher(api(), res, smap, self.state, self._apply))

    def _apply(self, fn: Callable[[], None]) -> None:
        self.loop.call_soon_threadsafe(fn)

    def start(self) -> None:
        for w in self.watchers:
            threading.Thread(target=w.run, name=f"watch-{w.resource.kind}", daemon=True).start()

    def stop(self) -> None:
        for w in self.watchers:
            w.stopped.set()
