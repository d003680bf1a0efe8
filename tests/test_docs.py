"""The README and docs/ stay true to the code: links resolve, the reading order's line counts are
the files' own, and every document the code's comments name is in the repository."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The README stays short: the rest lives in docs/
README_LINES = 150


def anchors(markdown):
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces
    as hyphens."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_links_resolve(doc):
    text = doc.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        linked = (doc.parent / path).resolve() if path else doc
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked.read_text()):
            broken.append(target)
    assert not broken, f"{doc.name}: links to nothing: {broken}"


def test_readme_is_short_and_its_reading_order_counts_lines():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_LINES

    # "1. `esd.py` (322 lines): ..." and "2. `train.py` (347): ..."
    counts = re.findall(r"^\d+\. `([\w/]+\.py)` \((\d+)(?: lines)?\)", text, flags=re.M)
    assert len(counts) >= 10, "the reading order lists the product files"
    wrong = {}
    for name, stated in counts:
        actual = len((ROOT / name).read_text().splitlines())
        if actual != int(stated):
            wrong[name] = (int(stated), actual)
    assert not wrong, f"README's reading order (stated, actual): {wrong}"

    # Every product file is in it
    product = {p.name for p in ROOT.glob("*.py")}
    assert product == {name for name, _ in counts}


def test_documents_named_in_the_code_exist():
    named = set()
    for source in [*ROOT.glob("*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/*.py")]:
        named |= set(re.findall(r"\b((?:docs|tests/fixtures)/[\w./-]+\.md)", source.read_text()))
    assert named, "the code points readers to docs/"
    missing = sorted(name for name in named if not (ROOT / name).exists())
    assert not missing, f"named in the code, not in the repository: {missing}"
