"""The front door: a README of at most 12 KB that links to the docs site's pages (`make docs` builds them strictly,
in `make test`), and a Quick start of exactly the two commands."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_readme_is_short_and_every_page_it_links_is_in_the_site():
    readme = (REPO / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    linked = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert linked and all((REPO / link).is_file() for link in linked), linked
    site = (REPO / "mkdocs.yml").read_text()
    assert all(link.removeprefix("docs/") in site for link in linked)  # in the site's navigation
    quick = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in quick.strip().splitlines()] == [["make", "run"], ["make", "test"]]
