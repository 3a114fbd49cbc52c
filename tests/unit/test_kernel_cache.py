"""Which cache entries go down to the kernel (FP_CACHE), and when they come back up: the
cache offers an entry once it is hot, the mirror hands down only what the kernel answers
exactly as the resolver would, a full map leaves entries to be offered again, and a mesh or
route change takes everything back.  The kernel's side is in tests/lab/test_fastpath_cache.py.
"""

from __future__ import annotations

from interceptor.datapath.answers import CachedAnswers, CachedReply, encode_cached
from interceptor.datapath.maps import FP_CK_CD, FP_CK_EDNS
from interceptor.dns import wire
from interceptor.node.kernelcache import KernelCacheMirror
from interceptor.settings import Endpoint, Settings, UpstreamSettings
from tests.unit.test_cache_hot import CLIENT, careful, query, resolver
from tests.unit.test_servicemap import se


class FakeAnswers(CachedAnswers):
    """FP_CACHE without a kernel: what was handed down, and a capacity to run out of."""

    def __init__(self, capacity: int = 100) -> None:
        self.capacity = capacity
        self.down: dict[tuple[bytes, int, int, str], CachedReply] = {}
        self.flushes = 0

    def flush(self) -> None:
        self.down.clear()
        self.flushes += 1

    def put(self, reply: CachedReply):  # type: ignore[no-untyped-def]
        if encode_cached(reply) is None:
            return "unfit"
        key = (reply.name, reply.qtype, reply.flags, reply.server)
        if key not in self.down and len(self.down) >= self.capacity:
            return "full"
        self.down[key] = reply
        return "pushed"

    def sweep(self, now: float | None = None) -> int:
        return 0


def hot(r, data: bytes, times: int) -> None:  # type: ignore[no-untyped-def]
    careful(r, data)
    for _ in range(times):
        assert r.fast(data, CLIENT) is not None


def mirror(r, m, answers: FakeAnswers, hits: int = 3) -> tuple[KernelCacheMirror, list[bool]]:  # type: ignore[no-untyped-def]
    modes: list[bool] = []
    return KernelCacheMirror(r, r.cache, m, answers, modes.append, hits), modes


def test_an_entry_goes_down_once_hot_with_the_resolvers_reply() -> None:
    r, _, clock, m = resolver()
    answers = FakeAnswers()
    mir, modes = mirror(r, m, answers)
    data = query("www.example.org", "A", 1, edns=True, cd=True)
    hot(r, data, 1)
    assert mir.turn(clock.now) == 0, "offered before it was hot"
    hot(r, data, 3)
    assert mir.turn(clock.now) == 1
    assert modes == [False]  # fixed upstreams (no original destination): any server
    (reply,) = answers.down.values()
    assert reply.name == wire.encode_name("www.example.org")
    assert reply.flags == FP_CK_EDNS | FP_CK_CD and reply.server == ""
    entry = r.cache.entries[next(iter(r.cache.entries))]
    assert reply.message == entry.message and reply.due == entry.due
    assert mir.turn(clock.now) == 0, "handed down twice"


def test_the_memo_offers_a_hot_entry_as_the_cache_does() -> None:
    r, _, clock, m = resolver()
    answers = FakeAnswers()
    mir, _ = mirror(r, m, answers, hits=50)
    data = query("www.example.org", "AAAA", 1)
    hot(r, data, 60)  # one Cache.hot, then memo hits within the same second
    assert mir.turn(clock.now) == 1


def test_what_the_kernel_would_not_answer_exactly_stays_up() -> None:
    r, _, clock, m = resolver()
    answers = FakeAnswers()
    mir, _ = mirror(r, m, answers, hits=1)
    for data in (
        query("www.example.org", "A", 1, edns=True, do=True),  # DO: the kernel falls through
        query("big.example.org", "TXT", 2),  # not A or AAAA
    ):
        careful(r, data)
        careful(r, data)
        r.fast(data, CLIENT)
    mir.turn(clock.now)
    assert answers.down == {}


def test_a_forward_zone_stays_up() -> None:
    """Its servers are chosen by matching labels, which the kernel does not do."""
    zone = ("example.org", (Endpoint("192.0.2.9", 53),))
    r, _, clock, m = resolver(Settings(upstream=UpstreamSettings(zones=(zone,))))
    answers = FakeAnswers()
    mir, _ = mirror(r, m, answers, hits=1)
    careful(r, query("www.example.org", "A", 1))
    careful(r, query("www.example.org", "A", 1))
    mir.turn(clock.now)
    assert answers.down == {}
    assert r.kernel_route(wire.encode_name("www.example.org"), b"192.0.2.9:53") is None


def test_routes_by_server_key_each_server_the_pod_asked() -> None:
    r, _, clock, m = resolver(asked={CLIENT: "192.0.2.53"})
    answers = FakeAnswers()
    mir, modes = mirror(r, m, answers, hits=1)
    data = query("www.example.org", "A", 1)
    hot(r, data, 2)
    mir.turn(clock.now)
    assert modes == [True]
    assert [x.server for x in answers.down.values()] == ["192.0.2.53"]
    name = wire.encode_name("www.example.org")
    assert r.kernel_route(name, b"203.0.113.1:53") is None  # not an allowed server


def test_a_full_map_leaves_the_entry_to_be_offered_again() -> None:
    r, _, clock, m = resolver()
    answers = FakeAnswers(capacity=1)
    mir, _ = mirror(r, m, answers, hits=1)
    a, b = query("www.example.org", "A", 1), query("www.example.org", "AAAA", 2)
    hot(r, a, 2)
    hot(r, b, 2)
    assert mir.turn(clock.now) == 1
    answers.capacity = 2
    clock.now += 1.5  # the memo's answers expire: the next hit goes through Cache.hot
    hot(r, b, 1)
    assert mir.turn(clock.now) == 1 and len(answers.down) == 2


def test_a_mesh_change_takes_everything_back_at_once() -> None:
    r, _, clock, m = resolver()
    answers = FakeAnswers()
    mir, _ = mirror(r, m, answers, hits=1)
    mir.turn(clock.now)
    data = query("www.example.org", "A", 1)
    hot(r, data, 2)
    assert mir.turn(clock.now) == 1
    flushes = answers.flushes
    m.upsert(se("wild", ["*.example.org"], "2024-01-01T00:00:00Z", addresses=["192.0.2.99"]))
    assert answers.flushes == flushes + 1 and answers.down == {}  # no turn needed
    assert not any(e.offered for e in r.cache.entries.values())


def test_a_route_change_takes_everything_back_on_the_next_turn() -> None:
    r, _, clock, m = resolver()
    answers = FakeAnswers()
    mir, modes = mirror(r, m, answers, hits=1)
    data = query("www.example.org", "A", 1)
    hot(r, data, 2)
    assert mir.turn(clock.now) == 1
    r.reconfigure(None)
    mir.turn(clock.now)
    assert answers.down == {} and modes == [False, False]


def test_a_name_some_namespaces_see_as_a_mesh_host_stays_up() -> None:
    """Made hot while forwarded for one client (its namespace does not see the entry), it
    must not go down: the kernel would give it to a pod whose namespace sees the VIP."""
    r, _, clock, m = resolver()
    answers = FakeAnswers()
    mir, _ = mirror(r, m, answers, hits=1)
    data = query("www.example.org", "A", 1)
    hot(r, data, 3)  # cached and offered while nobody saw a mesh host there
    private = se("p", ["www.example.org"], "2024-01-01T00:00:00Z", exportTo=["."])
    m.upsert(private)  # now ns1 sees it: the mesh change takes back, the offer stays up
    careful(r, data)  # forwarded again for this client, and so checked at this generation
    careful(r, data)
    # Offered anyway (the cache offers on hits, and a refresh offers again): the mirror is
    # the last guard.
    for key in r.cache.entries:
        r.cache.promotions[key] = None
        r.cache.entries[key].offered = False
    mir.turn(clock.now)
    assert answers.down == {}
    assert m.mesh_scoped("www.example.org")
