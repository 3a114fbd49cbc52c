"""The service map: an in-memory model that takes Kubernetes objects one event at a time and
keeps a table of precomputed wire answers consistent after every event.

Records come from *owners* (a Service with its EndpointSlices, a Namespace, a Pod, the zone
apex, the mesh).  On an event only the affected owner is recomputed, its records diffed
against what it contributed before, and only the names that changed get their answers
rebuilt.  Record sets are reference-counted, so two owners may contribute the same record
(a PTR for an IP present in two EndpointSlices) and the record lives until both are gone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from interceptor.dns import wire
from interceptor.dns.message import Answer
from interceptor.model import records
from interceptor.model.objects import (
    EndpointSlice,
    Key,
    KubeObject,
    Namespace,
    Pod,
    Service,
    ServiceEntry,
)
from interceptor.model.records import Contribution, Record
from interceptor.model.visibility import HostView, MeshHost, host_views
from interceptor.settings import PodRecords, ZoneSettings

Owner = tuple[str, ...]
RData = bytes | Counter[bytes]
"""A name's rdatas of one type: the rdata itself when there is one, held by one owner (the
common case, and a Counter costs more than the record); else how many owners hold each."""
APEX: Owner = ("apex",)
RECORD_TYPES = (wire.A, wire.AAAA, wire.CNAME, wire.SRV, wire.PTR, wire.NS, wire.SOA, wire.TXT)
"""Every type the map holds records of (:mod:`interceptor.model.records` makes no other)."""
ADDRESS_TYPES = (wire.A, wire.AAAA)
"""The types kept precomputed in :attr:`ServiceMap.answers` (see :meth:`ServiceMap.answer`)."""
MESH: Owner = ("mesh",)


class ServiceMap:
    """Kubernetes objects in, DNS answers out.

    Readers (the resolver) use :attr:`answers`, :meth:`exists`, :meth:`cname`,
    :meth:`answer`, :meth:`mesh_wildcard` and :meth:`namespace_exists`.  Every method
    leaves those views consistent before it returns.
    """

    def __init__(self, zone: ZoneSettings) -> None:
        self.settings = zone
        self.zone = zone.cluster_domain.strip(".").lower()
        self.zone_wire = wire.encode_name(self.zone)
        self.ttl = zone.ttl
        self.objects: dict[Key, KubeObject] = {}
        self._slices_by_service: dict[tuple[str, str], tuple[str, ...]] = {}
        self._rrs: dict[bytes, RData] = {}
        """(owner name wire + type) -> the rdatas of that record set.  One flat table: a dict
        of types per name cost about 200 bytes a name (three names a service)."""
        self._exist: Counter[str] = Counter()
        self._ns_refs: Counter[str] = Counter()
        self.generation = 0
        """Bumped by every event that changed anything (watchers of the map poll it)."""
        self.answers: dict[bytes, Answer] = {}
        """(lowercased qname wire + qtype) -> precomputed A or AAAA answer: the hot-path
        table (other types: :meth:`answer`)."""
        self._dirty: set[bytes] | None = None
        self._listeners: list[Callable[[set[bytes]], None]] = []
        self._names_dirty: set[str] | None = None
        self._name_listeners: list[Callable[[set[str]], None]] = []
        self._mesh: dict[str, HostView] = {}
        self.mesh_generation = 0
        """Bumped whenever the mesh hosts change: a name outside the zone that was forwarded
        (and cached) may be a mesh host now, and the cache's hot path must look again."""
        self._mesh_wild: dict[str, HostView] = {}
        self.mesh_scoped_any = False
        """Some mesh host answers by the client's namespace (ServiceEntry ``exportTo``): a
        name's answer may then depend on who asks (:meth:`mesh_scoped`)."""
        self._pods_by_ip: dict[str, tuple[Key, ...]] = {}
        self._mesh_listeners: list[Callable[[], None]] = []
        self._mesh_told = 0
        soa = wire.rr(self.zone_wire, wire.SOA, self.ttl, records.soa_rdata(self.zone, self.ttl))
        self.nxdomain = Answer(wire.NXDOMAIN, True, 0, 1, 0, soa)
        self.nodata = Answer(wire.NOERROR, True, 0, 1, 0, soa)
        self.mesh_nodata = Answer(wire.NOERROR, True, 0, 0, 0, b"")
        self._set_owner(Contribution(), self._contribution(APEX))

    # ----------------------------------------------------------------- events

    def subscribe(self, listener: Callable[[set[bytes]], None]) -> None:
        """Call ``listener`` after every event with the :attr:`answers` keys it added, changed
        or removed (a copy of the table elsewhere, such as the kernel's fast-path map, stays
        in step without rescanning it).  The listener runs on the caller's thread, after the
        map is consistent again."""
        self._listeners.append(listener)
        if self._dirty is None:
            self._dirty = set()

    def subscribe_names(self, listener: Callable[[set[str]], None]) -> None:
        """Call ``listener`` after every event with the names that began or ceased to exist
        (:meth:`exists`), as :meth:`subscribe` does for answers."""
        self._name_listeners.append(listener)
        if self._names_dirty is None:
            self._names_dirty = set()

    def subscribe_mesh(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after every event that changed the mesh hosts (exact or
        wildcard; :attr:`mesh_generation`): copies of answers to names found *not* ours
        (the kernel's cached forwarded names) must be looked at again."""
        self._mesh_listeners.append(listener)

    def existing_names(self) -> Iterable[str]:
        """Every name that exists (:meth:`exists`), for a copy kept in step by
        :meth:`subscribe_names`."""
        return list(self._exist)

    def _notify(self) -> None:
        if self._mesh_listeners and self._mesh_told != self.mesh_generation:
            self._mesh_told = self.mesh_generation
            for mesh_listener in self._mesh_listeners:
                mesh_listener()
        if self._names_dirty:
            # Names first: a copy that says which names exist (the kernel's junk test) must
            # know a new name before its answers appear, and lose it after they are gone.
            names, self._names_dirty = self._names_dirty, set()
            for name_listener in self._name_listeners:
                name_listener(names)
        if not self._dirty:
            return
        changed, self._dirty = self._dirty, set()
        for listener in self._listeners:
            listener(changed)

    def upsert(self, obj: KubeObject) -> None:
        """Add or replace one object (a watch ADDED or MODIFIED event)."""
        old = self.objects.get(obj.key)
        if old == obj:
            return
        self.generation += 1
        self._changed(obj, old)
        self._notify()

    def delete(self, key: Key) -> None:
        """Remove one object (a watch DELETED event); unknown keys are a no-op."""
        old = self.objects.get(key)
        if old is None:
            return
        self.generation += 1
        self._changed(None, old)
        self._notify()

    def replace(self, objects: Iterable[KubeObject], kinds: Iterable[str] | None = None) -> int:
        """Make the map hold exactly ``objects`` (of ``kinds``, default all) by applying the
        difference: unchanged objects are not touched, so answers never flap during a relist.
        Returns the number of objects added, changed or removed."""
        wanted = {o.key: o for o in objects}
        scope = set(kinds) if kinds is not None else None
        n = 0
        for key in [k for k in self.objects if scope is None or k[0] in scope]:
            if key not in wanted:
                self.delete(key)
                n += 1
        for obj in wanted.values():
            if self.objects.get(obj.key) != obj:
                self.upsert(obj)
                n += 1
        return n

    def _changed(self, new: KubeObject | None, old: KubeObject | None) -> None:
        """Apply one object's change: what its owners contribute is computed from the objects
        before and after, and only the difference touches the records.  Contributions are not
        kept: they are a pure function of the objects, and keeping them cost about a KB per
        service at 100,000 services."""
        obj = new if new is not None else old
        assert obj is not None
        owners = self._owners(new, old)
        before = [self._contribution(owner) for owner in owners]
        if new is None:
            del self.objects[obj.key]
        else:
            self.objects[obj.key] = new
        if isinstance(obj, Service | Pod):
            self._ns_ref(obj.namespace, +1 if old is None else 0, -1 if new is None else 0)
        if isinstance(obj, Pod):
            self._index_pod(old, new)
        elif isinstance(obj, EndpointSlice):
            self._move_slice(obj, old, new)
        elif isinstance(obj, ServiceEntry):
            self._recompute_mesh()
        for owner, had in zip(owners, before, strict=True):
            self._set_owner(had, self._contribution(owner))

    def _owners(self, new: KubeObject | None, old: KubeObject | None) -> list[Owner]:
        """The owners whose records one object's change may change."""
        obj = new if new is not None else old
        assert obj is not None
        if isinstance(obj, Namespace):
            return [("ns", obj.name)]
        if isinstance(obj, Service):
            owners: list[Owner] = [("svc", obj.namespace, obj.name)]
            if f"{obj.namespace}/{obj.name}" == self.settings.dns_service:
                owners.append(APEX)
            return owners
        if isinstance(obj, EndpointSlice):
            names = {s.service for s in (new, old) if isinstance(s, EndpointSlice)} - {None}
            return [("svc", obj.namespace, str(n)) for n in sorted(names, key=str)]
        if isinstance(obj, Pod):
            return [("pod", obj.namespace, obj.name)]
        return [MESH]

    def _contribution(self, owner: Owner) -> Contribution:
        """What ``owner`` contributes given the objects held now."""
        kind = owner[0]
        if kind == "svc":
            return self._service_records(owner[1], owner[2])
        if kind == "pod":
            pod = self.objects.get(("Pod", owner[1], owner[2]))
            if not isinstance(pod, Pod):
                return Contribution()
            verified = self.settings.pod_records is PodRecords.VERIFIED
            return records.pod_records(pod, self.zone, verified)
        if kind == "ns":
            if ("Namespace", "", owner[1]) not in self.objects:
                return Contribution()
            return records.namespace_names(owner[1], self.zone)
        if owner == APEX:
            namespace, _, name = self.settings.dns_service.partition("/")
            svc = self.objects.get(("Service", namespace, name))
            return records.apex_records(
                self.zone, self.ttl, svc if isinstance(svc, Service) else None
            )
        # Only hosts every client sees alike go into the shared table (and the kernel's copy);
        # the others are answered per client (:meth:`mesh_host`).
        out = Contribution()
        for host, view in self._mesh.items():
            m = view.answer(None) if view.uniform else None
            if m is not None:
                for ip in m.v4 + m.v6:
                    out.address(host, ip)
        return out

    def _move_slice(
        self, obj: EndpointSlice, old: KubeObject | None, new: KubeObject | None
    ) -> None:
        old_svc = old.service if isinstance(old, EndpointSlice) else None
        new_svc = new.service if isinstance(new, EndpointSlice) else None
        for svc_name, present in ((old_svc, False), (new_svc, True)):
            if svc_name is None:
                continue
            # A tuple, not a set: a service has one slice or a few (and 10,000 of them).
            _member(self._slices_by_service, (obj.namespace, svc_name), obj.name, present)

    def _ns_ref(self, namespace: str, add: int, remove: int) -> None:
        self._ns_refs[namespace] += add + remove
        if self._ns_refs[namespace] <= 0:
            del self._ns_refs[namespace]

    def _service_records(self, namespace: str, name: str) -> Contribution:
        svc = self.objects.get(("Service", namespace, name))
        if not isinstance(svc, Service):
            return Contribution()
        slices = [
            s
            for n in sorted(self._slices_by_service.get((namespace, name), ()))
            if isinstance(s := self.objects.get(("EndpointSlice", namespace, n)), EndpointSlice)
        ]
        return records.service_records(svc, slices, self.zone)

    def _recompute_mesh(self) -> None:
        hosts = host_views(self.mesh_entries(), self.settings.ipv6, self.settings.default_export_to)
        # Inside the cluster domain only hosts every namespace sees alike: names there exist
        # or not for everyone (NXDOMAIN, the kernel's junk test), and a name that existed for
        # some namespaces only would tell the others it is there.
        hosts = {
            h: v for h, v in hosts.items() if v.uniform or not self._in_zone(h.removeprefix("*."))
        }
        wild = {h[2:]: m for h, m in hosts.items() if h.startswith("*.")}
        exact = {h: m for h, m in hosts.items() if not h.startswith("*")}
        if wild != self._mesh_wild or exact != self._mesh:
            self.mesh_generation += 1
        self._mesh_wild = wild
        self._mesh = exact
        self.mesh_scoped_any = not all(v.uniform for v in (*wild.values(), *exact.values()))

    def _index_pod(self, old: KubeObject | None, new: KubeObject | None) -> None:
        """Keep :meth:`client_namespace`'s index: pod address -> the pods holding it.
        Host-network pods are left out: their address is the node's."""
        for pod, present in ((old, False), (new, True)):
            if not isinstance(pod, Pod) or pod.host_network:
                continue
            for ip in pod.ips:
                _member(self._pods_by_ip, ip, pod.key, present)

    # ------------------------------------------------------ record bookkeeping

    def _set_owner(self, old: Contribution, new: Contribution) -> None:
        dirty: set[str] = set()
        for rec in old.records - new.records:
            self._unref_record(rec)
            dirty.add(rec.name)
        for rec in new.records - old.records:
            self._ref_record(rec)
            dirty.add(rec.name)
        for name in old.names - new.names:
            self._unref_name(name)
        for name in new.names - old.names:
            self._ref_name(name)
        for name in dirty:
            self._compile(name)

    def _in_zone(self, name: str) -> bool:
        return name == self.zone or name.endswith("." + self.zone)

    def _ancestors(self, name: str) -> Iterable[str]:
        """The name and its ancestors up to the apex: all exist once the name does (RFC 8020).
        Names outside the zone (mesh hosts, reverse names) claim no ancestors."""
        yield name
        if not self._in_zone(name):
            return
        while name != self.zone:
            name = name.partition(".")[2]
            yield name

    def _ref_name(self, name: str) -> None:
        for n in self._ancestors(name):
            self._exist[n] += 1
            if self._names_dirty is not None and self._exist[n] == 1:
                self._names_dirty.add(n)

    def _unref_name(self, name: str) -> None:
        for n in self._ancestors(name):
            self._exist[n] -= 1
            if self._exist[n] <= 0:
                del self._exist[n]
                if self._names_dirty is not None:
                    self._names_dirty.add(n)

    def _ref_record(self, rec: Record) -> None:
        assert rec.rtype in RECORD_TYPES, rec
        key = wire.table_key(wire.encode_name(rec.name), rec.rtype)
        have = self._rrs.get(key)
        if have is None:
            self._rrs[key] = rec.rdata  # the common case: one rdata, one owner
            self._ref_name(rec.name)
            return
        if isinstance(have, bytes):
            have = self._rrs[key] = Counter({have: 1})
        if have[rec.rdata] == 0:
            self._ref_name(rec.name)
        have[rec.rdata] += 1

    def _unref_record(self, rec: Record) -> None:
        key = wire.table_key(wire.encode_name(rec.name), rec.rtype)
        have = self._rrs[key]
        if isinstance(have, bytes):
            del self._rrs[key]
            self._unref_name(rec.name)
            return
        have[rec.rdata] -= 1
        if have[rec.rdata] <= 0:
            del have[rec.rdata]
            self._unref_name(rec.name)
            if not have:
                del self._rrs[key]
            elif len(have) == 1 and next(iter(have.values())) == 1:
                self._rrs[key] = next(iter(have))  # back to the compact form

    def _types(self, name: str) -> dict[int, RData]:
        """The record sets of one name, by type (empty: the name has no records)."""
        owner = wire.encode_name(name)
        rrs = self._rrs
        return {
            rtype: have
            for rtype in RECORD_TYPES
            if (have := rrs.get(wire.table_key(owner, rtype))) is not None
        }

    # ------------------------------------------------------------ compilation

    def _compile(self, name: str) -> None:
        """Rebuild the precomputed A and AAAA answers of one name."""
        dirty = self._dirty
        owner = wire.encode_name(name)
        for rtype in ADDRESS_TYPES:
            key = wire.table_key(owner, rtype)
            if self.answers.pop(key, None) is not None and dirty is not None:
                dirty.add(key)
        types = self._types(name)
        # An alias answers only its CNAME; other types chase the target (the resolver does
        # that, as the target may live upstream).
        if wire.CNAME in types or not (wire.A in types or wire.AAAA in types):
            return
        negative = self.nodata if self._in_zone(name) else self.mesh_nodata
        for rtype in ADDRESS_TYPES:
            key = wire.table_key(owner, rtype)
            self.answers[key] = self._positive(name, types, [rtype]) if rtype in types else negative
            if dirty is not None:
                dirty.add(key)

    def answer(self, name: str, qtype: int) -> Answer | None:
        """The answer to a question of any other type than A and AAAA (those are in
        :attr:`answers`), made when asked: None when the name has no records of that type.
        SRV, PTR, CNAME, NS, SOA and TXT questions are rare next to addresses, and a kept
        answer costs about 300 bytes (three of them for every service)."""
        types = self._types(name)
        if qtype not in types or (wire.CNAME in types and qtype != wire.CNAME):
            return None
        return self._positive(name, types, [qtype])

    def _positive(self, name: str, types: dict[int, RData], rtypes: list[int]) -> Answer:
        body = bytearray()
        additional: list[bytes] = []
        an = 0
        for rtype in rtypes:
            for rdata in _sorted(types[rtype]):
                body += wire.rr(wire.QNAME_POINTER, rtype, self.ttl, rdata)
                an += 1
                if rtype in (wire.SRV, wire.NS):
                    target = _target(Record(name, rtype, rdata))
                    additional.extend(self.address_rrs(target))
        extra = list(dict.fromkeys(additional))  # dedupe, keep order
        return Answer(wire.NOERROR, True, an, 0, len(extra), bytes(body) + b"".join(extra))

    def any_answer(self, name: str) -> Answer | None:
        """Every record of an in-zone name, for an ANY question; None for a name without
        records of its own, or an alias (the CNAME is chased).  Made when asked, not kept:
        ANY is rare, and a table entry per name costs about 300 bytes (RFC 8482 would even
        allow a minimal answer)."""
        types = self._types(name)
        if not types or wire.CNAME in types or not self._in_zone(name):
            return None
        return self._positive(name, types, sorted(types))

    def address_rrs(self, name: str, rtypes: tuple[int, ...] = (wire.A, wire.AAAA)) -> list[bytes]:
        """The records of ``name`` of the given types, encoded with their full owner name."""
        types = self._types(name)
        owner = wire.encode_name(name)
        return [
            wire.rr(owner, t, self.ttl, rdata)
            for t in rtypes
            if t in types
            for rdata in _sorted(types[t])
        ]

    # ----------------------------------------------------------------- views

    def in_zone(self, name: str) -> bool:
        return self._in_zone(name)

    def exists(self, name: str) -> bool:
        """The name has records, or records below it (an empty non-terminal)."""
        return name in self._exist

    def cname(self, name: str) -> str | None:
        """The target of an ExternalName service at ``name``."""
        have = self._rrs.get(wire.table_key(wire.encode_name(name), wire.CNAME))
        if have is None:
            return None
        rdata = _sorted(have)[0]
        target, _ = wire.decode_name_plain(rdata, 0)
        return target

    def namespace_exists(self, namespace: str) -> bool:
        return ("Namespace", "", namespace) in self.objects or namespace in self._ns_refs

    def mesh_wildcard(self, name: str, namespace: str | None = None) -> MeshHost | None:
        """The most specific wildcard ServiceEntry host matching ``name`` that gives a client
        in ``namespace`` (None: an unknown client) an address, if any."""
        for view in self._wild_views(name):
            if (hit := view.answer(namespace)) is not None:
                return hit
        return None

    def _wild_views(self, name: str) -> Iterator[HostView]:
        """The wildcard hosts matching ``name``, the most specific first."""
        labels = name.split(".")
        for i in range(1, len(labels)):
            view = self._mesh_wild.get(".".join(labels[i:]))
            if view is not None:
                yield view

    def mesh_host(self, name: str, namespace: str | None = None) -> MeshHost | None:
        """The exact ServiceEntry host ``name`` as a client in ``namespace`` sees it (None:
        an unknown client, which sees only hosts exported to everyone)."""
        view = self._mesh.get(name)
        return view.answer(namespace) if view is not None else None

    def mesh_answer(self, name: str, namespace: str | None) -> MeshHost | None:
        """What ``name`` answers as a mesh host to a client in ``namespace``: the exact host,
        else the most specific wildcard (a host without an address for this client is not
        in its name table, so a wildcard may still match, as in Istio)."""
        return self.mesh_host(name, namespace) or self.mesh_wildcard(name, namespace)

    def mesh_scoped(self, name: str) -> bool:
        """Whether ``name``'s answer depends on the client's namespace: such a name is never
        answered from a copy shared by every client (the hot path's memory, the kernel's
        cached forwarded names)."""
        if not self.mesh_scoped_any:
            return False
        view = self._mesh.get(name)
        if view is not None:
            return not view.uniform
        return any(not v.uniform for v in self._wild_views(name))

    def mesh_scoped_wire(self, buf: bytes, offset: int = 0) -> bool:
        """:meth:`mesh_scoped` for the wire name at ``offset`` of ``buf`` (a query, a cache
        key); a name that does not decode is treated as scoped (not shared)."""
        if not self.mesh_scoped_any:
            return False
        try:
            name = wire.decode_name_plain(buf, offset)[0].lower()
        except (ValueError, IndexError):
            return True
        return self.mesh_scoped(name)

    def scoped_hosts(self) -> dict[str, HostView]:
        """The exact mesh hosts some namespaces see otherwise than everyone (not in
        :attr:`answers`): a copy that tells namespaces apart (the kernel's views) keeps
        them per namespace."""
        return {h: v for h, v in self._mesh.items() if not v.uniform}

    def mesh_reply(self, host: MeshHost, qtype: int) -> Answer:
        """The answer a mesh host gives to an A or AAAA question (NODATA, not authoritative
        of anything, for a family it has no address of)."""
        ips = host.v4 if qtype == wire.A else host.v6
        if not ips:
            return self.mesh_nodata
        body = b"".join(
            wire.rr(wire.QNAME_POINTER, qtype, self.ttl, wire.rdata_address(ip)[1]) for ip in ips
        )
        return Answer(wire.NOERROR, True, len(ips), 0, 0, body)

    def mesh_entries(self) -> list[ServiceEntry]:
        return [o for o in self.objects.values() if isinstance(o, ServiceEntry)]

    def client_namespace(self, ip: str) -> str | None:
        """The namespace of the pod holding address ``ip``; None for an address no known pod
        holds, or held by pods of two namespaces (a finished pod and the address's new
        owner): such a client sees only what everyone sees."""
        held = self._pods_by_ip.get(ip)
        if not held:
            return None
        namespaces = {k[1] for k in held}
        return next(iter(namespaces)) if len(namespaces) == 1 else None

    def stats(self) -> dict[str, int]:
        kinds = Counter(k[0] for k in self.objects)
        return {
            "namespaces": kinds["Namespace"],
            "services": kinds["Service"],
            "endpointslices": kinds["EndpointSlice"],
            "pods": kinds["Pod"],
            "serviceentries": kinds["ServiceEntry"],
            "rrsets": len(self._rrs),
            "answers": len(self.answers),
            "mesh_hosts": len(self._mesh) + len(self._mesh_wild),
        }


def _member(index: dict[Any, tuple[Any, ...]], key: Any, item: Any, present: bool) -> None:
    """Add ``item`` to (``present``) or remove it from the tuple ``index[key]``; an empty
    tuple is not kept."""
    members = tuple(m for m in index.get(key, ()) if m != item)
    if present:
        members += (item,)
    if members:
        index[key] = members
    else:
        index.pop(key, None)


def _sorted(have: RData) -> list[bytes]:
    """A name's rdatas of one type, in the order answers list them."""
    return [have] if isinstance(have, bytes) else sorted(have)


def _target(rec: Record) -> str:
    """The target name of an SRV or NS record."""
    offset = 6 if rec.rtype == wire.SRV else 0
    name, _ = wire.decode_name_plain(rec.rdata, offset)
    return name
