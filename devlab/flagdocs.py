"""The flag tables of docs/configuration.md, generated from the argument parser itself.

``python -m devlab.flagdocs --write`` rewrites the tables between the ``<!-- flags:CMD -->``
markers; tests/unit/test_docs.py fails when the file and the parser disagree, so a flag, a
default or a help text changed in code reaches the docs in the same commit.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from interceptor.cli import build_parser

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
COMMANDS = ("agent", "serve")
MARKER = re.compile(r"(<!-- flags:(\w+) -->\n)(.*?)(<!-- /flags:\2 -->)", re.S)


def _subparser(command: str) -> argparse.ArgumentParser:
    # The parser reads $NODE_NAME for a default: the docs describe it, not this machine.
    saved = os.environ.pop("NODE_NAME", None)
    try:
        parser = build_parser()
    finally:
        if saved is not None:
            os.environ["NODE_NAME"] = saved
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]  # type: ignore[no-any-return]
    raise KeyError(command)


def _cell(text: str, default: object) -> str:
    text = " ".join(text.split())
    # The default has its own column: drop the help's own mention of that same value (a
    # mention of something else, such as the agent's default or $NODE_NAME, stays).
    shown = re.escape(str(default))
    text = re.sub(rf"\s*\(default: {shown}\)$", "", text)
    text = re.sub(rf";\s*default: {shown}\)", ")", text)
    return text.replace("|", "\\|")


def table(command: str) -> str:
    """The markdown table of one command's flags: flag, default, meaning (its --help)."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for action in _subparser(command)._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if "--help" in action.option_strings:
            continue
        flags = ", ".join(f"`{o}`" for o in action.option_strings)
        metavar = action.metavar or (
            "{" + ",".join(map(str, action.choices)) + "}" if action.choices else None
        )
        if metavar and action.nargs != 0:
            flags = ", ".join(f"`{o} {metavar}`" for o in action.option_strings)
        default = action.default
        if isinstance(action, argparse._StoreTrueAction):
            shown = "off"
        elif default in (None, [], ""):
            shown = ""
        elif isinstance(action, argparse.BooleanOptionalAction):
            shown = "on" if default else "off"
        else:
            shown = f"`{default}`"
        meaning = (action.help or "").replace("%(default)s", str(default))
        rows.append(f"| {flags} | {shown} | {_cell(meaning, default)} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    """``text`` with every marked table regenerated."""
    return MARKER.sub(lambda m: m.group(1) + table(m.group(2)) + m.group(4), text)


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    new = render(text)
    if "--write" in argv:
        DOC.write_text(new)
        return 0
    sys.stdout.write(new)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
