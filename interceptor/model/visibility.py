"""Which ServiceEntry hosts a client sees, by the client's namespace: istiod's rules.

istiod (pilot/pkg/model/push_context.go, ``initServiceRegistry`` and
``servicesExportedToNamespace``; sidecar.go, ``appendSidecarServices``) builds, for each
namespace, the list of services a proxy there sees, and its DNS name table from that list:

* ``exportTo`` (or, when empty, meshConfig's ``defaultServiceExportTo``, ``*`` by default):
  ``*`` makes an entry visible to every namespace, and wins over any other value; else ``~``
  hides it from everyone; else ``.`` (the entry's own namespace) and namespace names list
  who sees it.
* A namespace's list is first the entries exported to it by namespace (``.`` or its name),
  then the entries exported to everyone, each part in creation order.
* The first entry of that list with a given host decides the host for the namespace.  An
  entry that gives the host no address (resolution NONE or STATIC without addresses, a
  wildcard without addresses) leaves it out of the name table: the name is forwarded.
* A client whose address is no known pod has no namespace: it sees only entries exported to
  everyone.

VIPs stay one global function of every entry (:func:`interceptor.model.vip.allocate`): a
host has the same VIP in every namespace that sees it, and on every node.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from interceptor.model.objects import EVERYONE, NO_ONE, OWN_NAMESPACE, Key, ServiceEntry
from interceptor.model.vip import V4_NET, V6_NET, Claim, allocate


@dataclass(frozen=True, slots=True)
class MeshHost:
    """A ServiceEntry host and the addresses it answers with."""

    host: str
    v4: tuple[str, ...]
    v6: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Scope:
    """Who sees one entry."""

    everyone: bool
    namespaces: frozenset[str] = frozenset()

    def sees(self, namespace: str | None) -> bool:
        return self.everyone or (namespace is not None and namespace in self.namespaces)


def scope(entry: ServiceEntry, default: tuple[str, ...]) -> Scope:
    export = entry.export_to or default
    if EVERYONE in export:
        return Scope(True)
    if NO_ONE in export:
        return Scope(False)
    return Scope(False, frozenset(entry.namespace if e == OWN_NAMESPACE else e for e in export))


@dataclass(frozen=True, slots=True)
class Decider:
    """The entry that decides a host for some clients, and what it answers (None: no
    address, the name is forwarded)."""

    entry: Key
    answer: MeshHost | None


@dataclass(frozen=True, slots=True)
class HostView:
    """What one host answers, by client namespace."""

    everyone: Decider | None
    """For a namespace without entries of its own for the host, and for an unknown client:
    the first entry exported to everyone (None: there is none)."""
    namespaces: tuple[tuple[str, Decider], ...] = ()
    """Namespaces with entries of their own for the host, exported to them by name or by
    ``.``: the first of those decides, whatever is exported to everyone."""

    @property
    def uniform(self) -> bool:
        """Every client gets the same answer (it may be copied where clients are not told
        apart: the shared answer table, the kernel)."""
        return not self.namespaces

    def decider(self, namespace: str | None) -> Decider | None:
        if namespace is not None:
            for ns, decider in self.namespaces:
                if ns == namespace:
                    return decider
        return self.everyone

    def answer(self, namespace: str | None) -> MeshHost | None:
        decider = self.decider(namespace)
        return decider.answer if decider is not None else None


@dataclass
class _Building:
    everyone: Decider | None = None
    namespaces: dict[str, Decider] = field(default_factory=dict)


def wildcard_covers(host: str, name: str) -> bool:
    """``host`` is a wildcard (``*.suffix``) and ``name`` is below its suffix."""
    return host.startswith("*.") and name.endswith(host[1:])


def creation_order(entries: Iterable[ServiceEntry]) -> list[ServiceEntry]:
    return sorted(entries, key=lambda e: (e.created, e.namespace, e.name))


def host_views(
    entries: Iterable[ServiceEntry], ipv6: bool, default: tuple[str, ...]
) -> dict[str, HostView]:
    """host (wildcards as ``*.suffix``) -> what it answers, for every host some client sees
    with an address."""
    ordered = creation_order(entries)
    vips4, vips6 = _vips(ordered, ipv6)
    building: dict[str, _Building] = {}
    for se in ordered:
        sc = scope(se, default)
        if not sc.everyone and not sc.namespaces:
            continue
        for host in se.hosts:
            decider = Decider(se.key, _addresses(se, host, vips4, vips6))
            b = building.setdefault(host, _Building())
            if sc.everyone:
                if b.everyone is None:
                    b.everyone = decider
            else:
                for ns in sc.namespaces:
                    b.namespaces.setdefault(ns, decider)
    out: dict[str, HostView] = {}
    for host, b in building.items():
        public = b.everyone.answer if b.everyone is not None else None
        # A namespace whose own entry answers as everyone's does needs no view of its own.
        own = tuple(sorted((ns, d) for ns, d in b.namespaces.items() if d.answer != public))
        if public is None and all(d.answer is None for _, d in own):
            continue  # forwarded for every client
        out[host] = HostView(b.everyone, own)
    return out


def _vips(ordered: list[ServiceEntry], ipv6: bool) -> tuple[dict[str, str], dict[str, str]]:
    """The auto-allocated VIPs, as istiod's allocator assigns them (pilot/pkg/networking/
    serviceentry/ip_autoallocation.go): hosts of entries with a resolution other than NONE,
    without addresses of their own or from istiod, not opted out by label, wildcards
    excepted; whoever sees them."""
    claims = [
        Claim(se.created, se.namespace, se.name, host)
        for se in ordered
        if _allocates(se)
        for host in se.hosts
        if not host.startswith("*") and not _status(se, host)
    ]
    return allocate(claims, V4_NET), allocate(claims, V6_NET) if ipv6 else {}


def _allocates(se: ServiceEntry) -> bool:
    return not se.addresses and se.resolution != "NONE" and se.autoallocate


def _status(se: ServiceEntry, host: str) -> set[str]:
    return {ip for h, ip in se.status_addresses if h in (host, "")}


def _addresses(
    se: ServiceEntry, host: str, vips4: dict[str, str], vips6: dict[str, str]
) -> MeshHost | None:
    """What one entry answers for one of its hosts, as Istio's DNS proxy does
    (pkg/dns/server/name_table.go):

    * ``spec.addresses`` as given, whatever the resolution;
    * resolution NONE: the IP addresses of ``spec.endpoints`` when the entry has ports
      (Istio's name table answers a passthrough service's endpoints), else nothing;
    * else ``status.addresses`` when istiod filled them, or the host's VIP as istiod's
      allocator would assign it (:func:`_vips`);
    * nothing (the name is forwarded) when none of these applies.
    """
    given = set(se.addresses)
    if not given:
        if se.resolution == "NONE":
            given = set(se.endpoints) if se.has_ports else set()
        else:
            given = _status(se, host)
    if given:
        addrs = [ipaddress.ip_address(ip) for ip in given]
        return MeshHost(
            host,
            tuple(sorted(a.compressed for a in addrs if a.version == 4)),
            tuple(sorted(a.compressed for a in addrs if a.version == 6)),
        )
    if host not in vips4 or not _allocates(se):
        return None
    return MeshHost(host, (vips4[host],), (vips6[host],) if host in vips6 else ())


def explain(
    entries: Iterable[ServiceEntry], name: str, namespace: str | None, default: tuple[str, ...]
) -> list[str]:
    """Why each entry naming ``name`` (exactly or by wildcard) is or is not seen by a client
    in ``namespace`` (None: not a known pod), in the order istiod considers them."""
    lines: list[str] = []
    who = f"namespace {namespace}" if namespace is not None else "an unknown client"
    scoped = [(se, scope(se, default)) for se in creation_order(entries)]
    # istiod's order: entries exported to the namespace first, then the public ones.
    for se, sc in sorted(scoped, key=lambda pair: pair[1].everyone):
        hosts = [h for h in se.hosts if h == name or wildcard_covers(h, name)]
        if not hosts:
            continue
        export = ",".join(se.export_to) if se.export_to else ",".join(default) + " (the default)"
        if sc.everyone:
            why = f"exported to everyone ({export}): {who} sees it"
        elif not sc.namespaces:
            why = f"exported to no one ({export})"
        else:
            seen = "sees it" if sc.sees(namespace) else "does not see it"
            listed = ", ".join(sorted(sc.namespaces))
            why = f"exported to {listed} ({export}): {who} {seen}"
        lines.append(f"ServiceEntry {se.namespace}/{se.name} ({', '.join(hosts)}): {why}")
    return lines
