"""How a stopping agent decides between handover, uninstall and plain detach, from what it
saw of its own DaemonSet (scripted API streams; the real API server is the cluster tier's)."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping
from typing import Any

from interceptor.node.lifecycle import OwnerWatch, StopMode
from interceptor.sources.kube import ApiError

POD = {
    "metadata": {
        "name": "dns-interceptor-x1",
        "ownerReferences": [{"kind": "DaemonSet", "name": "dns-interceptor"}],
    }
}
DS = {"metadata": {"name": "dns-interceptor", "resourceVersion": "5"}}


class Api:
    """Pods list -> the agent's pod; DaemonSets list, then one watch stream, then errors."""

    def __init__(self, pods: list[Any], daemonsets: list[Any], events: list[Any]) -> None:
        self.pods, self.daemonsets, self.events = pods, daemonsets, events
        self.done = threading.Event()

    def list(self, path: str, params: Mapping[str, str]) -> dict[str, Any]:
        if path.endswith("/pods"):
            assert params["fieldSelector"] == "metadata.name=dns-interceptor-x1"
            return {"items": self.pods}
        assert params["fieldSelector"] == "metadata.name=dns-interceptor"
        if not self.daemonsets:
            self.done.set()
            raise ApiError(401, "Unauthorized")  # a revoked token: keep the last state
        return {"items": self.daemonsets.pop(0), "metadata": {"resourceVersion": "5"}}

    def watch(self, path: str, params: Mapping[str, str]) -> Iterator[dict[str, Any]]:
        assert params["resourceVersion"] == "5" and params["watch"] == "1"
        yield from self.events
        self.events = []


def decide(api: Api) -> StopMode:
    watch = OwnerWatch(lambda: api, "kube-system", "dns-interceptor-x1")
    watch.start()
    # Until the script is played out (or the thread gave up: no DaemonSet owner).
    for _ in range(500):
        if api.done.is_set() or not watch._thread.is_alive():
            break
        api.done.wait(0.01)
    watch.stop()
    return watch.mode()


def test_daemonset_present_means_handover() -> None:
    assert decide(Api([POD], [[DS]], [{"type": "MODIFIED", "object": DS}])) is StopMode.HANDOVER


def test_daemonset_deleted_means_uninstall_even_after_the_token_is_revoked() -> None:
    api = Api([POD], [[DS]], [{"type": "DELETED", "object": DS}])
    assert decide(api) is StopMode.UNINSTALL


def test_daemonset_being_deleted_means_uninstall() -> None:
    dying = {"metadata": {**DS["metadata"], "deletionTimestamp": "2026-11-30T00:00:00Z"}}
    assert decide(Api([POD], [[DS]], [{"type": "MODIFIED", "object": dying}])) is (
        StopMode.UNINSTALL
    )


def test_daemonset_gone_at_the_first_list_means_uninstall() -> None:
    assert decide(Api([POD], [[]], [])) is StopMode.UNINSTALL


def test_no_daemonset_owner_means_detach() -> None:
    bare = {"metadata": {"name": "dns-interceptor-x1", "ownerReferences": []}}
    api = Api([bare], [], [])
    assert decide(api) is StopMode.DETACH


def test_never_reached_the_api_means_detach() -> None:
    api = Api([POD], [], [])
    assert decide(api) is StopMode.DETACH
