"""Plain-text tables in the bpftool/kubectl manner: upper-case headers, two spaces between
columns, numbers right-aligned, and never wider than the terminal's 80 columns (the widest
text column is shortened with an ellipsis when it must)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

WIDTH = 80
GAP = "  "


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}".rstrip("0").rstrip(".") if value < 100 else f"{value:.0f}"
    if isinstance(value, list | tuple):
        return ",".join(cell(v) for v in value) or "-"
    return str(value)


def _numeric(values: Sequence[Any]) -> bool:
    present = [v for v in values if v is not None]
    return bool(present) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in present
    )


def sort_key(row: Sequence[Any]) -> tuple[tuple[int, Any], ...]:
    """Numbers before text, numbers by value, text by its characters."""
    out: list[tuple[int, Any]] = []
    for v in row:
        if isinstance(v, int | float) and not isinstance(v, bool):
            out.append((0, v))
        else:
            out.append((1, cell(v)))
    return tuple(out)


def render(
    headers: Sequence[str],
    rows: Sequence[Sequence[Any]],
    width: int = WIDTH,
    sort: bool = True,
) -> str:
    """The table as text (no trailing newline).  Rows are sorted unless ``sort`` is False."""
    data = sorted(rows, key=sort_key) if sort else list(rows)
    numeric = [_numeric([r[i] for r in data]) for i in range(len(headers))]
    text = [[cell(v) for v in r] for r in data]
    head = [h.upper() for h in headers]
    widths = [max([len(head[i])] + [len(r[i]) for r in text]) for i in range(len(head))]
    total = sum(widths) + len(GAP) * (len(widths) - 1)
    while total > width:
        # Shorten the widest text column; numbers are never cut.
        candidates = [i for i in range(len(widths)) if not numeric[i] and widths[i] > len(head[i])]
        if not candidates:
            break
        i = max(candidates, key=lambda j: widths[j])
        cut = min(total - width, widths[i] - max(len(head[i]), 4))
        if cut <= 0:
            break
        widths[i] -= cut
        total -= cut
    lines = []
    for r in [head, *text]:
        parts = []
        for i, v in enumerate(r):
            if len(v) > widths[i]:
                v = v[: widths[i] - 1] + "…"
            last = i == len(r) - 1
            if numeric[i]:
                parts.append(v.rjust(widths[i]))
            else:
                parts.append(v if last else v.ljust(widths[i]))
        lines.append(GAP.join(parts).rstrip())
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    """A vertical FIELD/VALUE listing, for single-entry maps."""
    return render(["field", "value"], [(k, cell(v)) for k, v in pairs], sort=False)
