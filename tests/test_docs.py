"""The README is a front page whose links all lead somewhere; the docs site itself is built with warnings as
errors by ``make docs`` (every link and anchor checked by mkdocs)."""

from __future__ import annotations

import re

from tests.support import ROOT

README = (ROOT / "README.md").read_text()
LINK = re.compile(r"\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """The heading ids mkdocs' toc gives a page (lower case, punctuation dropped, spaces to dashes)."""
    found = set()
    for heading in re.findall(r"^#+ (.+)$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(re.sub(r"-+", "-", slug))
    return found


def test_the_readme_is_a_front_page():
    assert len(README.splitlines()) <= 300
    for command in ("make run", "make test"):
        assert command in README


def test_every_relative_link_of_the_readme_leads_to_a_file_and_its_anchor():
    relative = [link for link in LINK.findall(README) if not link.startswith(("http://", "https://"))]
    assert relative
    for link in relative:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), link
        if anchor:
            assert anchor in anchors(target.read_text()), link


def test_the_readme_leads_in_one_hop_to_what_a_newcomer_looks_for():
    wanted = {
        "where decode rows are scheduled": "worker/engine/scheduler.py",
        "where a KV block is allocated": "worker/engine/blocks.py",
        "where a job's state changes": "jobs/transitions.py",
        "where a webhook is sent": "jobs/webhooks.py",
        "how to add a GPU machine": "docs/operating/scale-out.md",
    }
    rows = {line.split("|")[1].strip(): line for line in README.splitlines() if line.startswith("| ")}
    for question, target in wanted.items():
        assert f"]({target}" in rows[question], question
        assert (ROOT / target).exists()
