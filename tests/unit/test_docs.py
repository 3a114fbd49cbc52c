"""The docs say what the code does: the flag tables are the parser's, and the README stays a
guide (about 12 KB) whose links resolve."""

from __future__ import annotations

import re

from devlab.flagdocs import COMMANDS, DOC, MARKER, render
from tests.helpers import ROOT


def test_flag_tables_match_the_parser() -> None:
    text = DOC.read_text()
    assert {m.group(2) for m in MARKER.finditer(text)} == set(COMMANDS)
    assert render(text) == text, "run: python -m devlab.flagdocs --write"


def test_readme_is_a_guide_whose_links_resolve() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 13_000
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            assert (doc.parent / target).resolve().exists(), f"{doc.name}: {target}"
        assert "../shared" not in doc.read_text(), f"{doc.name} cites a file outside the repo"
