"""The README and the docs pages: every relative link reaches a file (and a heading, for #anchors),
the results block's markers are there once each, and the set-up commands come first."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)")


def pages() -> list[Path]:
    docs = sorted((ROOT / "docs").glob("*.md"))
    assert docs, ROOT / "docs"
    return [ROOT / "README.md", *docs]


def prose(text: str) -> str:
    """The text outside code blocks and code spans, where a link is a link."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text, lowercased, punctuation but - and _ dropped, spaces -> -."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading's anchor in a markdown file; repeated headings get -1, -2 ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        match = re.match(r"#{1,6} (.+?)#*\s*$", line)
        if match:
            base = slug(match.group(1))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in LINK.findall(prose(path.read_text())):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...: not a file here
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    return broken


def test_every_relative_link_reaches_a_file_and_heading():
    broken = {p.name: b for p in pages() if (b := broken_links(p))}
    assert not broken, broken


def test_a_broken_link_is_found(tmp_path):
    (tmp_path / "a.md").write_text("# A page\n\n## Its part\n")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#its-part) [self](#b) `[code](nowhere.md)`\n\n# B\n\n"
                    "[gone](missing.md) [no heading](a.md#nothing)\n\n```\n[in a block](nowhere.md)\n```\n")
    assert broken_links(page) == [f"missing.md: no file {tmp_path / 'missing.md'}",
                                  "a.md#nothing: no heading #nothing in a.md"]


def test_slugs_follow_github():
    assert slug("Does ImageNet transfer help? The study's question on the real scans") == \
        "does-imagenet-transfer-help-the-studys-question-on-the-real-scans"
    assert slug("The custom CNN's stronger recipe (`profile=cnn_simclr`), lever by lever") == \
        "the-custom-cnns-stronger-recipe-profilecnn_simclr-lever-by-lever"


def test_the_readme_holds_the_results_markers_once_each():
    text = (ROOT / "README.md").read_text()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1
    assert text.index(begin) < text.index(end)


def test_the_setup_commands_come_first_and_ci_runs_the_second():
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    install = 'python3.11 -m venv .venv && . .venv/bin/activate && pip install -q -e ".[dev]"'
    assert blocks[:2] == [f"{install} && dvc repro\n", f"{install} && pytest\n"]
    assert (ROOT / ".ci" / "run").read_text().rstrip().splitlines()[-1] == blocks[1].strip()
