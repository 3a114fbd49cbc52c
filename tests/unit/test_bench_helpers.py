"""The pure parts of the node-local benchmarks (tests/bench/nodelocal.py, ndots.py): per-query
latencies from ``dnsperf -v``, percentiles, metric sums, CPU shares, feature detection.  A
mistake here would put wrong numbers in the README, so they get tests like any other code."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tests.bench.common import BenchError, parse_dnsperf
from tests.bench.ndots import setups_from_help, v6
from tests.bench.nodelocal import (
    LINE,
    CpuSample,
    CpuUse,
    Load,
    Measured,
    best_of,
    check_latencies,
    cpu_use,
    md_table,
    metric_sums,
    percentile,
)

DNSPERF_V = """\
[Status] Sending queries (to 10.96.0.10:53)
> NOERROR svc-0.bench.svc.cluster.local A 0.000174
> NXDOMAIN b.example.test A 0.000071
> NOERROR svc-0.bench.svc.cluster.local A 0.000024
[Status] Testing complete (end of file)

Statistics:

  Queries sent:         3
  Queries completed:    3 (100.00%)
  Queries lost:         0 (0.00%)

  Response codes:       NOERROR 2 (66.67%), NXDOMAIN 1 (33.33%)
  Average packet size:  request 32, response 40
  Run time (s):         0.003579
  Queries per second:   838.222967

  Average Latency (s):  0.000090 (min 0.000024, max 0.000174)
  Latency StdDev (s):   0.000061
"""


def test_per_query_lines_are_parsed_in_microseconds() -> None:
    lat = [1e6 * float(m[3]) for m in LINE.findall(DNSPERF_V)]
    assert lat == pytest.approx([174.0, 71.0, 24.0])
    perf = parse_dnsperf("x", "cmd", DNSPERF_V)
    check_latencies("x", perf, lat)  # mean 89.7 µs vs dnsperf's 90 µs: consistent


def test_latencies_that_disagree_with_dnsperf_are_rejected() -> None:
    perf = parse_dnsperf("x", "cmd", DNSPERF_V)
    with pytest.raises(BenchError, match="latencies for 3 completed"):
        check_latencies("x", perf, [174.0, 71.0])
    with pytest.raises(BenchError, match="differs"):
        check_latencies("x", perf, [500.0, 500.0, 500.0])


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 1001)]
    assert percentile(values, 50) == 500
    assert percentile(values, 99) == 990
    assert percentile(values, 99.9) == 999
    assert percentile(values, 100) == 1000
    assert percentile([7.0], 99.9) == 7.0


def test_metric_sums_add_matching_samples_and_leave_out_absent_metrics() -> None:
    text = (
        "# HELP interceptor_fastpath_total in-kernel answers\n"
        'interceptor_fastpath_total{result="hit"} 120.0\n'
        'interceptor_fastpath_total{result="miss"} 3.0\n'
        'interceptor_requests_total{proto="udp",qtype="A",rcode="NOERROR",source="cache"} 5.0\n'
        'interceptor_requests_total{proto="udp",qtype="A",rcode="NXDOMAIN",source="auth"} 7.0\n'
        "interceptor_requests_created 1.7e9\n"
    )
    sums = metric_sums(
        text,
        {
            "hits": 'interceptor_fastpath_total{result="hit"',
            "answered": "interceptor_requests_total",
            "absent": "interceptor_autopath_total",
        },
    )
    assert sums == {"hits": 120.0, "answered": 12.0}


def test_cpu_use_is_the_busy_share_of_each_cpu() -> None:
    a = CpuSample({0: (100, 10, 1000), 1: (0, 0, 1000)})
    b = CpuSample({0: (190, 40, 1100), 1: (25, 5, 1100)})
    use = cpu_use(a, b)
    assert (use[0].busy_pct, use[0].softirq_pct) == (90.0, 30.0)
    assert (use[1].busy_pct, use[1].softirq_pct) == (25.0, 5.0)


def test_dnsperf_arguments() -> None:
    q = Path("/tmp/q")
    assert Load(10, 4, 2, 100).args("10.96.0.10", q) == [
        "dnsperf",
        "-s",
        "10.96.0.10",
        "-d",
        "/tmp/q",
        "-c",
        "4",
        "-T",
        "2",
        "-q",
        "100",
        "-t",
        "2",
        "-l",
        "10",
    ]
    fixed = Load(5, 1, 1, 100, rate=10_000, verbose=True).args("x", q)
    assert fixed[-3:] == ["-Q", "10000", "-v"]
    assert "-n" in Load(0, 1, 1, 20, runs=2).args("x", q)


def test_autopath_rows_follow_the_agent_help() -> None:
    rows, notes = setups_from_help("  --autopath, --no-autopath  answer the search path")
    assert [r.flags for r in rows] == [None, ("--no-autopath",), ("--autopath",)]
    assert notes == []
    rows, notes = setups_from_help("  --no-ipv6  build without IPv6")
    assert [r.flags for r in rows] == [None, ()]
    assert notes and "autopath" in notes[0]


def test_ipv6_expectations_are_in_glibc_text_form() -> None:
    assert v6("ext", 0) == "fd00:77::1"
    assert v6("qps", 255) == "fd00:77:1::100"


def test_markdown_table() -> None:
    assert md_table(["a", "b"], [["x", "1"]]).splitlines() == [
        "| a | b |",
        "| --- | ---: |",
        "| x | 1 |",
    ]


def measured(qps: float, busy: float, dnsperf: float, server: float, soft: float) -> Measured:
    perf = replace(parse_dnsperf("x", "cmd", DNSPERF_V), qps=qps, dnsperf_cpu_pct=dnsperf)
    cpu = {0: CpuUse(busy / 2, soft / 2), 1: CpuUse(busy / 2, soft / 2)}
    return Measured("x", perf, cpu, {0}, {1}, server, 40.0, [3.0, 1.0, 2.0], {}, 1.0)


def test_other_cpu_is_what_neither_dnsperf_nor_the_server_used() -> None:
    assert measured(1, busy=150, dnsperf=60, server=50, soft=20).other_pct == 40.0
    assert measured(1, busy=100, dnsperf=60, server=50, soft=20).other_pct == 0.0


def test_best_round_is_the_fastest_or_the_least_disturbed() -> None:
    a = measured(100, busy=130, dnsperf=60, server=50, soft=20)  # 20% other
    b = measured(120, busy=170, dnsperf=60, server=50, soft=20)  # 60% other
    assert best_of([a, b], fixed_rate=False).perf.qps == 120
    chosen = best_of([a, b], fixed_rate=True)
    assert chosen.perf.qps == 100 and chosen.latencies_us == [1.0, 2.0, 3.0]
    assert chosen.lost_in_all_rounds == 0 and len(chosen.rounds) == 2
