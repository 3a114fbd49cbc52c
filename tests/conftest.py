from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import Dnsmasq, Served, start_dnsmasq, start_serve, stop

TESTS = Path(__file__).parent
TIERS = ("unit", "process", "lab", "e2e", "cluster")
"""Each directory under tests/ is a tier, and its marker: what a test needs says where it
lives (see docs/testing.md), so ``-m 'not lab'`` means "no root" without a list to keep."""


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--no-skip",
        action="store_true",
        help="fail the run if any test was skipped (make test: everything is installed)",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(TESTS.resolve()).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With --no-skip, a skipped test fails the run: a skip must never pass for a pass."""
    if not session.config.getoption("--no-skip"):
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter is not None else []
    if skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(
                f"--no-skip: {len(skipped)} test(s) skipped; every tier must run here",
                red=True,
            )


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
