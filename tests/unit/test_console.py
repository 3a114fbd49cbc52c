"""The console without a kernel: table layout, the verbs' argument parsing and help, and
`top`'s frame."""

from __future__ import annotations

from pathlib import Path

import pytest

from interceptor.cli import build_parser
from interceptor.console.table import render
from interceptor.console.verbs import COMMANDS, EXAMPLES
from interceptor.ops.counters import Snapshot
from tests.unit.samples import pod, state

# ----------------------------------------------------------------------------- tables


def test_table_headers_upper_sorted_numbers_right_aligned() -> None:
    out = render(["name", "count"], [("zeta", 5), ("alpha", 120), ("mid", 7)]).splitlines()
    assert out[0].split() == ["NAME", "COUNT"]
    assert [ln.split()[0] for ln in out[1:]] == ["alpha", "mid", "zeta"]
    assert out[2].endswith("    7") and out[1].endswith("  120")


def test_table_never_wider_than_80_columns() -> None:
    rows = [(f"namespace-{i}/" + "p" * 70, "fd00:10:244::" + "a" * 20, i * 1000) for i in range(5)]
    out = render(["pod", "addresses", "queries"], rows)
    assert max(len(ln) for ln in out.splitlines()) <= 80
    assert "…" in out
    assert "4000" in out  # numbers are never cut


# ----------------------------------------------------------------------------- CLI


@pytest.mark.parametrize(
    "argv",
    [
        ["-j", "net", "show"],
        ["net", "show", "-j"],
        ["net", "-j", "show", "dev", "dvh0"],
    ],
)
def test_json_flag_before_or_after_the_verb(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    assert args.json and args.command == "net" and args.action == "show"


def test_every_verb_has_examples_in_its_help() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for cmd in COMMANDS:
        help_text = sub.choices[cmd].format_help()  # type: ignore[attr-defined]
        assert "examples:" in help_text and EXAMPLES[cmd].splitlines()[1].strip() in help_text
    assert "interceptor net show" in parser.format_help()


def test_bad_usage_is_one_line_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    from interceptor.cli import main

    rc = main(["net", "show", "eth0", "--state-dir", "/nonexistent"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("Error:") and "net show [dev IFACE]" in err
    rc = main(["map", "dump", "FLOWS", "--pin-path", "/nonexistent", "--state-dir", "/x"])
    err = capsys.readouterr().err
    assert rc == 1 and "/nonexistent does not exist" in err and "Traceback" not in err


def test_top_frame_busiest_pod_first_within_80_columns() -> None:
    from interceptor.console.top import frame

    before = Snapshot(0, (pod("quiet", 10), pod("busy", 0, ns="a-rather-long-namespace-name")))
    after = Snapshot(
        1_000_000_000, (pod("quiet", 11), pod("busy", 250, ns="a-rather-long-namespace-name"))
    )
    text = frame(before, after, state(), 1.0)
    lines = text.splitlines()
    assert lines[0].startswith("interceptor top: 2 pods, 251.0 q/s")
    assert "AGENT NOT RUNNING" in lines[0]  # pid 1 is not an interceptor
    assert lines[2].split()[:3] == ["POD", "IFACE", "QUERIES/S"]
    assert lines[3].startswith("a-rather-long-namespace") and lines[4].startswith("ns1/quiet")
    assert max(len(ln) for ln in lines) <= 80


def test_stats_on_a_directory_without_our_maps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from interceptor.cli import main

    rc = main(["stats", "--pin-path", str(tmp_path), "--state-dir", str(tmp_path)])
    assert rc == 1 and "no interceptor counters pinned" in capsys.readouterr().err


def test_top_shows_a_limited_pod() -> None:
    from interceptor.console.top import frame
    from interceptor.ops.counters import PodCounters

    def limited(n: int) -> PodCounters:
        return PodCounters("ns1", "noisy", ("10.0.0.1",), ("dvh0",), (0,), {"limited": n})

    text = frame(Snapshot(0, (limited(0),)), Snapshot(10**9, (limited(500),)), state(), 1.0)
    header, row = text.splitlines()[2:4]
    assert "LIMITED/S" in header and "500" in row
