"""What a stopping agent should leave behind: it depends on why it stops.

* **handover**: the agent's DaemonSet still exists (a rollout, a deleted or evicted pod, a
  node drain): a successor is coming.  Filters and pinned maps stay; the kernel keeps
  answering its answer map for a bounded grace (``Datapath.hand_over``).
* **uninstall**: the DaemonSet was deleted (``kubectl delete -k``): nothing is coming.
  Filters, pins and the resolver address all go.
* **detach**: anything else (no DaemonSet known: run by hand, or the API never said): the
  filters and the address go, the pins stay for a later agent and the inspection CLI.

A SIGTERM cannot tell these apart, and the API cannot always be asked at that moment: a
force-deleted pod's token stops working at once, and so does every token of a deleted
ServiceAccount.  So the agent watches its own DaemonSet for its whole life and decides from
what it last saw, before any signal arrives.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from interceptor.sources.kube import Api, ApiError

log = logging.getLogger(__name__)


class StopMode(enum.Enum):
    HANDOVER = "handover"
    UNINSTALL = "uninstall"
    DETACH = "detach"


class OwnerWatch:
    """Follows the DaemonSet that owns this agent's pod (list, then watch, in a thread)."""

    def __init__(self, api: Callable[[], Api], namespace: str, pod_name: str) -> None:
        self._api = api
        self.namespace = namespace
        self.pod_name = pod_name
        self.daemonset: str | None = None
        self.state: str = "unknown"
        """unknown (never seen), present, or deleted (gone, or deletionTimestamp set)."""
        self.stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="owner-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopped.set()

    def mode(self) -> StopMode:
        if self.state == "present":
            return StopMode.HANDOVER
        if self.state == "deleted":
            return StopMode.UNINSTALL
        return StopMode.DETACH

    # ------------------------------------------------------------ thread

    def _run(self) -> None:
        backoff = 0.5
        while not self.stopped.is_set():
            try:
                api = self._api()
                if self.daemonset is None:
                    self.daemonset = self._owner(api)
                    if self.daemonset is None:
                        log.info(
                            "pod %s/%s has no DaemonSet owner: a stop detaches without handover",
                            self.namespace,
                            self.pod_name,
                        )
                        return
                self._follow(api)
                backoff = 0.5
            except (ApiError, OSError, ValueError) as exc:
                # 401/403 after a force-delete or an uninstall: keep the last state seen.
                log.debug("owner watch: %s", exc)
            except Exception as exc:  # the client's own errors (urllib3, config)
                log.debug("owner watch: %s", exc)
            self.stopped.wait(backoff)
            backoff = min(backoff * 2, 10.0)

    def _owner(self, api: Api) -> str | None:
        data = api.list(
            f"/api/v1/namespaces/{self.namespace}/pods",
            {"fieldSelector": f"metadata.name={self.pod_name}"},
        )
        for pod in data.get("items", []):
            for ref in pod.get("metadata", {}).get("ownerReferences", []) or []:
                if ref.get("kind") == "DaemonSet" and ref.get("name"):
                    return str(ref["name"])
        return None

    def _follow(self, api: Api) -> None:
        path = f"/apis/apps/v1/namespaces/{self.namespace}/daemonsets"
        selector = {"fieldSelector": f"metadata.name={self.daemonset}"}
        data = api.list(path, selector)
        items = data.get("items", [])
        self._observe(items[0] if items else None)
        rv = str(data.get("metadata", {}).get("resourceVersion", ""))
        params = {**selector, "watch": "1", "resourceVersion": rv, "timeoutSeconds": "300"}
        for event in api.watch(path, params):
            if self.stopped.is_set():
                return
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "DELETED":
                self._observe(None)
            elif kind in ("ADDED", "MODIFIED"):
                self._observe(obj)
            elif kind == "ERROR":
                return  # 410 Gone and the like: list again

    def _observe(self, ds: Mapping[str, Any] | None) -> None:
        state = (
            "deleted"
            if ds is None or (ds.get("metadata") or {}).get("deletionTimestamp")
            else "present"
        )
        if state != self.state:
            log.info("DaemonSet %s/%s: %s", self.namespace, self.daemonset, state)
        self.state = state
