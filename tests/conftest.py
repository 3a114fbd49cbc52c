from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Dnsmasq, Served, start_dnsmasq, start_serve, stop

BIG_TXT = ",".join(["x" * 200] * 10)  # ~2 KB: over any UDP limit we use, so TC and TCP


@pytest.fixture(scope="session")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dnsmasq]:
    """dnsmasq as the upstream: authoritative-only for upstream.test, no forwarding."""
    tmp = tmp_path_factory.mktemp("upstream")
    server = start_dnsmasq(
        Path(tmp),
        "--local=/upstream.test/",
        "--local-ttl=60",
        "--host-record=www.upstream.test,192.0.2.53",
        "--host-record=other.example,192.0.2.54",
        f"--txt-record=big.upstream.test,{BIG_TXT}",
    )
    yield server
    stop(server.proc)


@pytest.fixture(scope="module")
def served(upstream: Dnsmasq) -> Iterator[Served]:
    s = start_serve("--upstream", f"127.0.0.1:{upstream.port}")
    yield s
    stop(s.proc)
