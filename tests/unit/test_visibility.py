"""ServiceEntry exportTo: which namespace sees which entry, as istiod decides
(interceptor/model/visibility.py), and the resolver answering each client by it, with no
shared copy (the hot path's memory, the cache's hot path) leaking one namespace's answer to
another."""

from __future__ import annotations

import asyncio
from typing import Any

import dns.message
import dns.rcode
import pytest

from interceptor.model.objects import KubeObject, ServiceEntry, parse
from interceptor.model.servicemap import ServiceMap
from interceptor.model.visibility import Scope, explain, host_views, scope
from interceptor.resolve.cache import Cache
from interceptor.resolve.decision import Rule
from interceptor.resolve.resolver import Resolver
from interceptor.settings import AutopathSettings, Endpoint, Settings, ZoneSettings
from tests.unit.fakes import FakeForwarder

HOST = "svc.mesh.test"
UPSTREAM_ANSWER = (
    "192.0.2.9"  # what the upstream says of HOST: the answer for those who don't see it
)
POD = {"ns1": "10.0.1.1", "ns2": "10.0.2.1", "ns3": "10.0.3.1"}
STRANGER = "10.9.9.9"


def entry(
    name: str,
    namespace: str,
    created: str,
    hosts: list[str] | None = None,
    export_to: list[str] | None = None,
    **spec: Any,
) -> ServiceEntry:
    body: dict[str, Any] = {"hosts": hosts or [HOST], "resolution": "DNS", **spec}
    if export_to is not None:
        body["exportTo"] = export_to
    obj = parse(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": namespace, "creationTimestamp": created},
            "spec": body,
        }
    )
    assert isinstance(obj, ServiceEntry)
    return obj


def pod(namespace: str, name: str, ip: str, host_network: bool = False) -> KubeObject:
    return parse(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"hostNetwork": host_network},
            "status": {"podIPs": [{"ip": ip}]},
        }
    )


def seen(views: dict[str, Any], namespace: str | None, host: str = HOST) -> tuple[str, ...] | None:
    view = views.get(host)
    answer = view.answer(namespace) if view is not None else None
    return answer.v4 if answer is not None else None


T1, T2, T3 = "2026-01-01T00:00:00Z", "2026-01-02T00:00:00Z", "2026-01-03T00:00:00Z"


# ------------------------------------------------------------------ the rules


@pytest.mark.parametrize(
    ("export_to", "default", "expected"),
    [
        ([], ("*",), Scope(True)),
        (["*"], ("*",), Scope(True)),
        (["*", "~"], ("*",), Scope(True)),  # "*" wins over anything
        (["~"], ("*",), Scope(False)),
        (["~", "ns2"], ("*",), Scope(False)),  # "~" without "*" hides it from everyone
        (["."], ("*",), Scope(False, frozenset({"ns1"}))),
        ([".", "ns2"], ("*",), Scope(False, frozenset({"ns1", "ns2"}))),
        (["ns2"], ("*",), Scope(False, frozenset({"ns2"}))),  # not its own namespace
        (["ns1"], ("*",), Scope(False, frozenset({"ns1"}))),
        ([], (".",), Scope(False, frozenset({"ns1"}))),  # the mesh default applies
        ([], ("~",), Scope(False)),
    ],
)
def test_scope_follows_istiod(
    export_to: list[str], default: tuple[str, ...], expected: Scope
) -> None:
    assert scope(entry("e", "ns1", T1, export_to=export_to), default) == expected


def test_private_entry_is_seen_only_in_its_namespace() -> None:
    views = host_views(
        [entry("e", "ns1", T1, export_to=["."], addresses=["10.1.0.1"])], False, ("*",)
    )
    assert seen(views, "ns1") == ("10.1.0.1",)
    assert seen(views, "ns2") is None
    assert seen(views, None) is None  # an unknown client sees only what everyone sees
    assert not views[HOST].uniform


def test_exported_by_name_is_seen_there_and_not_at_home() -> None:
    views = host_views(
        [entry("e", "ns1", T1, export_to=["ns2"], addresses=["10.1.0.1"])], False, ("*",)
    )
    assert seen(views, "ns2") == ("10.1.0.1",)
    assert seen(views, "ns1") is None


def test_hidden_entry_is_seen_by_no_one() -> None:
    assert (
        host_views([entry("e", "ns1", T1, export_to=["~"], addresses=["10.1.0.1"])], False, ("*",))
        == {}
    )


def test_own_entry_beats_an_older_public_one() -> None:
    """istiod lists a namespace's own entries (exported to it by "." or by name) before the
    public ones, whatever their age; the first with the host decides."""
    views = host_views(
        [
            entry("public", "ns3", T1, addresses=["10.3.0.1"]),
            entry("private", "ns1", T2, export_to=["."], addresses=["10.1.0.1"]),
        ],
        False,
        ("*",),
    )
    assert seen(views, "ns1") == ("10.1.0.1",)
    assert seen(views, "ns2") == ("10.3.0.1",)
    assert seen(views, None) == ("10.3.0.1",)


def test_oldest_of_equals_wins() -> None:
    for order in (1, -1):
        entries = [
            entry("new", "ns2", T2, addresses=["10.2.0.1"]),
            entry("old", "ns1", T1, addresses=["10.1.0.1"]),
        ][::order]
        views = host_views(entries, False, ("*",))
        assert seen(views, "ns3") == ("10.1.0.1",)
        assert views[HOST].uniform


def test_own_entry_without_an_address_forwards_the_name_there() -> None:
    """A namespace's own entry with resolution NONE gives the host no address: the name is
    forwarded there, even though a public entry gives it a VIP elsewhere."""
    views = host_views(
        [
            entry("public", "ns3", T1),
            entry("private", "ns1", T2, export_to=["."], resolution="NONE"),
        ],
        False,
        ("*",),
    )
    assert seen(views, "ns1") is None
    vip = seen(views, "ns2")
    assert vip is not None and vip[0].startswith("240.240.")


def test_a_host_has_one_vip_wherever_it_is_seen() -> None:
    entries = [
        entry("a", "ns1", T1, export_to=["."]),
        entry("b", "ns2", T2, export_to=["."]),
    ]
    views = host_views(entries, False, ("*",))
    assert seen(views, "ns1") == seen(views, "ns2")
    assert seen(views, "ns1") is not None
    # ...and the same as if everyone saw it: visibility is not an input of allocation.
    public = host_views([entry("a", "ns1", T1), entry("b", "ns2", T2)], False, ("*",))
    assert seen(public, None) == seen(views, "ns1")


def test_explain_says_who_sees_what() -> None:
    entries = [
        entry("public", "ns3", T1, addresses=["10.3.0.1"]),
        entry("private", "ns1", T2, export_to=["."], addresses=["10.1.0.1"]),
    ]
    lines = explain(entries, HOST, "ns2", ("*",))
    assert lines[0].startswith("ServiceEntry ns1/private") and "does not see it" in lines[0]
    assert lines[1].startswith("ServiceEntry ns3/public") and "sees it" in lines[1]


# ------------------------------------------------------------------ the map


def smap_with(*objects: KubeObject, **zone: Any) -> ServiceMap:
    m = ServiceMap(ZoneSettings(**zone))
    m.replace(list(objects) + [pod(ns, f"p-{ns}", ip) for ns, ip in POD.items()])
    return m


def test_only_hosts_everyone_sees_alike_go_into_the_shared_table() -> None:
    m = smap_with(
        entry("shared", "ns1", T1, hosts=["shared.mesh.test"], addresses=["10.0.0.5"]),
        entry("private", "ns1", T1, export_to=["."], addresses=["10.1.0.1"]),
    )
    keys = {k[:-2] for k in m.answers}
    assert b"\x06shared\x04mesh\x04test\x00" in keys
    assert b"\x03svc\x04mesh\x04test\x00" not in keys
    assert m.mesh_scoped(HOST) and not m.mesh_scoped("shared.mesh.test")
    assert m.mesh_host(HOST, "ns1") is not None and m.mesh_host(HOST, "ns2") is None


def test_default_export_to_from_the_mesh_setting() -> None:
    m = smap_with(entry("e", "ns1", T1, addresses=["10.1.0.1"]), default_export_to=(".",))
    assert m.mesh_host(HOST, "ns1") is not None
    assert m.mesh_host(HOST, "ns2") is None and m.mesh_host(HOST) is None


def test_wildcards_follow_the_same_rules() -> None:
    m = smap_with(
        entry("wild", "ns1", T1, hosts=["*.corp.test"], export_to=["."], addresses=["10.1.0.7"]),
        entry("outer", "ns3", T1, hosts=["*.test"], addresses=["10.3.0.7"]),
    )
    a1 = m.mesh_wildcard("db.corp.test", "ns1")
    a2 = m.mesh_wildcard("db.corp.test", "ns2")
    assert a1 is not None and a1.v4 == ("10.1.0.7",)
    assert a2 is not None and a2.v4 == ("10.3.0.7",)  # the less specific one it does see
    assert m.mesh_scoped("db.corp.test") and not m.mesh_scoped("db.other.test")


def test_client_namespace_by_pod_address() -> None:
    m = smap_with()
    assert m.client_namespace(POD["ns2"]) == "ns2"
    assert m.client_namespace(STRANGER) is None
    # An address held by pods of two namespaces (a finished pod, its address's new owner)
    # belongs to neither; a host-network pod's address is the node's, not the pod's.
    m.upsert(pod("ns3", "reused", POD["ns2"]))
    assert m.client_namespace(POD["ns2"]) is None
    m.delete(("Pod", "ns3", "reused"))
    assert m.client_namespace(POD["ns2"]) == "ns2"
    m.upsert(pod("ns3", "hostnet", "10.0.0.100", host_network=True))
    assert m.client_namespace("10.0.0.100") is None


# ------------------------------------------------------------------ the resolver


def ask(r: Resolver, ip: str, qid: int = 7) -> tuple[int, list[str], str]:
    q = dns.message.make_query(HOST, "A")
    q.id = qid
    data = q.to_wire()
    client = (ip, 40000)
    fast = r.fast(data, client)
    if fast is not None:
        reply = fast
        rule = "fast"
    else:
        decision = asyncio.run(r.decide(data, False, client))
        assert decision.reply is not None
        reply, rule = decision.reply, decision.rule
        asyncio.run(r.resolve(data, False, client))  # what the hot path may remember
    msg = dns.message.from_wire(reply)
    return msg.rcode(), sorted(rr.to_text() for rrset in msg.answer for rr in rrset), rule


@pytest.mark.parametrize("autopath", [True, False])  # without it, map answers are remembered
def test_each_client_gets_its_namespaces_answer_and_nothing_leaks_through_copies(
    autopath: bool,
) -> None:
    m = smap_with(entry("private", "ns1", T1, export_to=["."], addresses=["10.1.0.1"]))
    r = Resolver(
        m,
        FakeForwarder({HOST: {"A": [UPSTREAM_ANSWER]}}),
        Settings(autopath=AutopathSettings(enabled=autopath)),
        [Endpoint("192.0.2.53", 53)],
        cache=Cache(),
    )
    r.synced.open()
    # Alternate, several rounds: every answer a shared copy could hold has been made by then
    # (the forwarded one cached and hot, the VIP remembered by the hot path if it could be).
    for _ in range(6):
        rcode, answers, rule = ask(r, POD["ns1"])
        assert (rcode, answers) == (dns.rcode.NOERROR, ["10.1.0.1"]), rule
        assert rule == Rule.MESH_SCOPED
        for ip in (POD["ns2"], STRANGER):
            rcode, answers, rule = ask(r, ip)
            assert (rcode, answers) == (dns.rcode.NOERROR, [UPSTREAM_ANSWER]), (ip, rule)
            assert rule in (Rule.FORWARDED, Rule.CACHED), rule


def test_a_public_host_is_still_answered_by_the_hot_path() -> None:
    m = smap_with(entry("public", "ns1", T1, addresses=["10.1.0.1"]))
    r = Resolver(m, FakeForwarder({}), Settings(), [Endpoint("192.0.2.53", 53)])
    r.synced.open()
    assert ask(r, STRANGER)[1:] == (["10.1.0.1"], "fast")


def test_a_host_in_the_cluster_domain_must_be_seen_alike_by_everyone() -> None:
    """Names under the cluster domain exist for everyone or for no one: a private entry there
    is left out (as if it did not exist), a public one answers."""
    inside = "db.ns1.svc.cluster.local"
    m = smap_with(
        entry("private", "ns1", T1, hosts=[inside], export_to=["."], addresses=["10.1.0.1"]),
        entry("public", "ns1", T1, hosts=["x.ns2.svc.cluster.local"], addresses=["10.1.0.2"]),
    )
    assert m.mesh_host(inside, "ns1") is None and not m.exists(inside)
    assert m.mesh_host("x.ns2.svc.cluster.local") is not None
    assert m.exists("x.ns2.svc.cluster.local")


# ------------------------------------------------------------------ Istio's addresses


def labelled(se: ServiceEntry, labels: dict[str, str]) -> ServiceEntry:
    obj = parse(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {
                "name": se.name,
                "namespace": se.namespace,
                "creationTimestamp": se.created,
                "labels": labels,
            },
            "spec": {"hosts": list(se.hosts), "resolution": se.resolution},
        }
    )
    assert isinstance(obj, ServiceEntry)
    return obj


def test_addresses_as_istios_name_table_gives_them() -> None:
    ports = [{"number": 443, "name": "https", "protocol": "TLS"}]
    cases: list[tuple[ServiceEntry, str | None]] = [
        # istiod's allocator: any resolution but NONE, without addresses of its own.
        (entry("s", "ns1", T1, hosts=["static.test"], resolution="STATIC"), "240.240."),
        (entry("d", "ns1", T1, hosts=["dns.test"]), "240.240."),
        (
            labelled(
                entry("o", "ns1", T1, hosts=["optout.test"]),
                {"networking.istio.io/enable-autoallocate-ip": "false"},
            ),
            None,
        ),
        # istiod's own status.addresses win over ours, for STATIC too.
        (entry("t", "ns1", T1, hosts=["status.test"], resolution="STATIC"), None),
        # NONE: a passthrough service's endpoints, when it has ports.
        (
            entry(
                "n",
                "ns1",
                T1,
                hosts=["none.test"],
                resolution="NONE",
                ports=ports,
                endpoints=[{"address": "10.7.0.1"}, {"address": "db.example"}],
            ),
            "10.7.0.1",
        ),
        (
            entry(
                "m",
                "ns1",
                T1,
                hosts=["noports.test"],
                resolution="NONE",
                endpoints=[{"address": "10.7.0.2"}],
            ),
            None,
        ),
        (entry("w", "ns1", T1, hosts=["*.wild.test"], resolution="DNS"), None),  # no VIP
    ]
    status = parse(
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "ServiceEntry",
            "metadata": {"name": "t", "namespace": "ns1", "creationTimestamp": T1},
            "spec": {"hosts": ["status.test"], "resolution": "STATIC"},
            "status": {"addresses": [{"value": "240.240.9.9", "host": "status.test"}]},
        }
    )
    assert isinstance(status, ServiceEntry)
    cases[3] = (status, "240.240.9.9")
    views = host_views([se for se, _ in cases], False, ("*",))
    for se, want in cases:
        got = seen(views, None, se.hosts[0])
        if want is None:
            assert got is None, se
        else:
            assert got is not None and len(got) == 1 and got[0].startswith(want), (se, got)
