"""Mesh hosts by namespace in the kernel: each namespace with pods on this node gets a view
number, written into its pods' PODS entries, and FP_ANSWERS holds the answers of the hosts
that namespaces see differently (ServiceEntry ``exportTo``) under the views that see them.

The resolver decides by the pod's namespace too (:meth:`ServiceMap.mesh_host`), and view 0,
or a view without an entry for the name, always leaves the question to it.  So the one thing
that must never happen is a pod holding another namespace's view: numbers are never reused
while the agent lives, and a new agent starts from an empty set of views (the answer map's
load removes a previous agent's), writing its pods' PODS entries anew.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from interceptor.datapath.answers import ViewAnswers
from interceptor.dns import wire
from interceptor.dns.message import Answer
from interceptor.errors import InterceptorError
from interceptor.model.nodepods import NodePod
from interceptor.model.servicemap import ServiceMap

log = logging.getLogger(__name__)

MAX_VIEW = 0xFFFF
"""fp_key.view is 16 bits; past that, pods get view 0 (the resolver answers their mesh hosts
that namespaces see differently)."""


class MeshViews:
    def __init__(self, smap: ServiceMap, answers: ViewAnswers | None) -> None:
        self.smap = smap
        self.answers = answers
        self.ids: dict[str, int] = {}
        """namespace -> its view, for this agent's life"""
        self._next = 1
        self._live: set[str] = set()
        """Namespaces with pods on this node now: only their views get entries."""
        if answers is not None:
            smap.subscribe_mesh(self.sync)

    def view_of(self, namespace: str) -> int:
        view = self.ids.get(namespace)
        if view is None:
            if self._next > MAX_VIEW:
                return 0
            view = self.ids[namespace] = self._next
            self._next += 1
        return view

    def views_for(self, pods: Iterable[NodePod]) -> dict[str, int]:
        """pod IP -> its namespace's view, for the datapath's PODS entries; remembers which
        namespaces have pods here (:meth:`sync` writes entries for those)."""
        out: dict[str, int] = {}
        live: set[str] = set()
        if not self.smap.mesh_scoped_any:
            # Every pod sees every host alike: view 0 for all, and no second lookup in the
            # kernel for the names it does not hold (pods get their views, on the agent's
            # next pass, once a host is seen per namespace; the resolver answers until then).
            self._live = live
            return out
        for pod in pods:
            live.add(pod.namespace)
            view = self.view_of(pod.namespace)
            for ip in pod.ips:
                # An address two namespaces' pods hold belongs to neither, as for the
                # resolver (ServiceMap.client_namespace): view 0.
                out[ip] = view if out.get(ip, view) == view else 0
        self._live = live
        return out

    def sync(self) -> None:
        """Bring the kernel's view entries in step with the map's hosts and the namespaces
        here (after a mesh change, and after the pods' PODS entries were written)."""
        if self.answers is None:
            return
        wanted: dict[tuple[bytes, int], Answer] = {}
        smap = self.smap
        for host, view in smap.scoped_hosts().items():
            owner = wire.encode_name(host)
            for namespace in self._live:
                number = self.ids.get(namespace, 0)
                seen = view.answer(namespace)
                if number == 0 or seen is None:
                    continue
                for qtype in (wire.A, wire.AAAA):
                    wanted[(wire.table_key(owner, qtype), number)] = smap.mesh_reply(seen, qtype)
        try:
            held = self.answers.sync(wanted)
        except (OSError, InterceptorError) as exc:  # the kernel's copy only
            log.warning("mesh views: kernel entries not brought in step: %s", exc)
            return
        log.debug("mesh views: %d kernel entries for %d namespaces", held, len(self._live))
