"""What the resolver decided for one query, as it decided it.

Every answer from the careful path carries the rule that produced it, so ``interceptor
query`` reports the resolver's own decision instead of guessing it again (as CoreDNS's plugins
each know what they answered).  The ``source`` is the metric label; the ``rule`` is finer.
"""

from __future__ import annotations

from dataclasses import dataclass

from interceptor.settings import Endpoint

Client = tuple[str, int]
"""The client's (address, port) as the listener saw it."""


class Rule:
    """The rules, in the order :meth:`Resolver.decide` tries them."""

    DROPPED = "dropped"
    """Not a query we can answer at all (no header): nothing is sent."""
    MALFORMED = "malformed"
    """FORMERR or NOTIMP: a broken question, an opcode we do not serve."""
    BADVERS = "badvers"
    """EDNS version other than 0 (RFC 6891 6.1.3)."""
    REFUSED = "refused"
    """Zone transfers and classes other than IN."""
    NOT_SYNCED = "not-synced"
    """A cluster name before the first full sync: SERVFAIL, never a cacheable NXDOMAIN."""
    TABLE = "table"
    """The precomputed answer table (what the hot path and the kernel answer from)."""
    POD_RECORD = "pod-record"
    """``a-b-c-d.<ns>.pod.<zone>`` synthesized from the name (--pod-records insecure)."""
    EMPTY_NON_TERMINAL = "empty-non-terminal"
    """A cluster name that exists (names below it do) without records: NODATA."""
    NXDOMAIN = "nxdomain"
    """A cluster name that does not exist; never forwarded."""
    AUTOPATH = "autopath"
    """The pod's search list completed on the server: CNAME to the first name that exists."""
    MESH_WILDCARD = "mesh-wildcard"
    """A name under a wildcard ServiceEntry host: its addresses."""
    MESH_SCOPED = "mesh-scoped"
    """A ServiceEntry host not exported to everyone, or answering otherwise in the client's
    namespace: its addresses as the client's namespace sees it (``exportTo``)."""
    EXTERNALNAME = "externalname"
    """ExternalName: a CNAME chain, then the target's records (map, mesh or upstream)."""
    CNAME_LOOP = "cname-loop"
    """An ExternalName chain longer than the resolver follows: SERVFAIL."""
    NOT_ALLOWED = "not-allowed"
    """The server the pod asked is not an allowed forwarding target: REFUSED, not relayed."""
    CACHED = "cached"
    """Forwarded before; answered from the node cache."""
    FORWARDED = "forwarded"
    """Not ours: asked upstream (or shared with an identical question in flight)."""
    STALE = "stale"
    """Every upstream failed; an expired cached answer was served (RFC 8767)."""
    UPSTREAM_FAILED = "upstream-failed"
    """Every upstream failed and nothing was cached: SERVFAIL."""


@dataclass(slots=True)
class Decision:
    reply: bytes | None
    """The response (None: send nothing)."""
    source: str
    """Where the answer came from: the ``source`` metric label (authoritative, mesh, cache,
    upstream, stale, error)."""
    rule: str
    """Which :class:`Rule` answered."""
    target: str | None = None
    """The name the answer continues at: an ExternalName's final target, or the autopath
    candidate that answered."""
    upstreams: tuple[Endpoint, ...] = ()
    """The servers asked for a forwarded name, in order."""
    via: str = ""
    """Why those servers (the flag or ConfigMap entry that chose them)."""
    per_client: bool = False
    """The answer depends on the client's namespace (a mesh host some namespaces see
    otherwise): never remembered for the next client."""
