"""The user's documentation holds together: every relative link in README.md and docs/*.md reaches a file of this
repository (and a heading there, where the link names one), nothing the repository ships refers to files outside
it, and the README stays a short front page."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from tests.conftest import ROOT

README_MAX_BYTES = 8500

# Markdown pages whose links are checked: the front page, docs/, and the READMEs beside code.
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "slurm" / "README.md",
                ROOT / "containers" / "README.md", ROOT / "tools" / "slurm" / "README.md"])

# Shipped text that must not point outside the repository: a user who clones it has none of those files.
SCANNED_DIRS = ("docs", "oel_hpc", "tools", "conf", "slurm", "containers")
SCANNED_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".sh", ".toml", ".txt", ".def", ".cfg", ".sbatch"}
OUTSIDE = re.compile(r"\.\./shared|/work/|\bshared/(?:notes|DESIGN|ANCHORS|SEED)|\bDESIGN(?:\.md)?\s*§"
                     r"|\bANCHORS\.md|SEED-README")
# Lines that still name a page outside the repository, in files being refactored in parallel (left alone here to
# keep the merge clean). Each entry must still occur somewhere, so the list empties as the lines are reworded.
PENDING: set[str] = set()  # lines allowed for now (reworded later): none

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"(?<!!)\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def prose(text: str) -> str:
    """The text outside fenced code blocks (a `# comment` in a bash block is no heading, a link in code no link)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading anchors on its text
    text = text.strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(prose(page.read_text())):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Path) -> list[str]:
    return LINK.findall(INLINE_CODE.sub("", prose(page.read_text())))


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of `page` that reaches no file of the repository at `root`, or no heading of it."""
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...: not ours to check
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
            continue
        try:
            dest.relative_to(root)
        except ValueError:
            broken.append(f"{target}: outside the repository")
            continue
        if anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no heading '#{anchor}' in {dest.relative_to(root)}")
    return broken


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    assert page.is_file(), f"{page.relative_to(ROOT)} is missing"
    assert not broken_links(page), f"{page.relative_to(ROOT)}: broken links: {broken_links(page)}"


def test_docs_folder_is_reached_from_the_readme():
    reached = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    unreached = [p.name for p in (ROOT / "docs").glob("*.md") if p.resolve() not in reached]
    assert not unreached, f"docs pages the README does not link to: {unreached}"


def test_a_broken_link_or_anchor_is_caught(tmp_path):
    """The checker itself: it must report a missing file, a missing heading and a page outside the repository,
    and accept good links, web links and what sits in code."""
    repo = tmp_path / "repo"
    (repo / "docs").mkdir(parents=True)
    (repo / "README.md").write_text("# Front\n\n## Run\n")
    (repo / "docs" / "design.md").write_text("# Design\n")
    (tmp_path / "x.md").write_text("# Outside\n")
    page = repo / "docs" / "probe.md"
    page.write_text("# Probe page\n\n## A heading, with `code` & more\n\n"
                    "[ok](design.md) [ok](#a-heading-with-code--more) [ok](../README.md#run) [web](https://x.y/z)\n"
                    "```bash\n# not a heading\n[not a link](nowhere.md)\n```\n`[not a link](nowhere.md)`\n"
                    "[bad](nowhere.md) [bad](design.md#no-such-heading) [bad](#not-a-heading) [bad](../../x.md)\n")
    assert sorted(broken_links(page, root=repo)) == sorted([
        "nowhere.md: no such file", "design.md#no-such-heading: no heading '#no-such-heading' in docs/design.md",
        "#not-a-heading: no heading '#not-a-heading' in docs/probe.md", "../../x.md: outside the repository"])


def test_github_slugs():
    assert slug("Dependencies: submitit") == "dependencies-submitit"
    assert slug("The megatron-core backend (trainer=megatron)") == "the-megatron-core-backend-trainermegatron"
    assert slug("SmolLM2-135M-Instruct on CPU") == "smollm2-135m-instruct-on-cpu"
    assert slug("Following a run: the status dashboard") == "following-a-run-the-status-dashboard"


def test_nothing_points_outside_the_repository():
    files = [ROOT / "README.md"] + [p for d in SCANNED_DIRS for p in sorted((ROOT / d).rglob("*"))
                                    if p.is_file() and p.suffix in SCANNED_SUFFIXES and "__pycache__" not in p.parts
                                    and "assets" not in p.relative_to(ROOT).parts]
    found, used = [], set()
    for path in files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                pending = next((p for p in PENDING if p in line), None)
                if pending:
                    used.add(pending)
                else:
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "references to files outside the repository:\n" + "\n".join(found)
    assert used == PENDING, f"PENDING lines no longer found (reworded: drop them from PENDING): {PENDING - used}"


def test_readme_is_a_short_front_page():
    size = (ROOT / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (at most {README_MAX_BYTES}): move detail to docs/"


def test_readme_keeps_the_commands_ci_runs():
    """.ci/run installs and tests with the README's commands; they must stay the same."""
    readme, ci = (ROOT / "README.md").read_text(), (ROOT / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]" torch==2.13.0' in readme and '-e ".[test]" torch==2.13.0' in ci
    uninstall = "pip uninstall -y torchvision torchaudio torchcodec"  # they break the CPU build of vLLM
    assert uninstall in readme and uninstall in ci
    assert "python -m pytest -q" in readme and "python -m pytest -q" in ci


CODE_PATH = re.compile(r"`((?:oel_hpc|tools|tests|conf|containers|slurm|docs)/[^`\s{}*<>$]*)`")


def named_paths_missing(page: Path, root: Path = ROOT) -> list[str]:
    """Repository paths a page names in backticks (`oel_hpc/slurm.py`, `tests/test_x.py::test_y`) that do not exist:
    the docs follow the code when modules move."""
    missing = []
    for number, line in enumerate(page.read_text().splitlines(), 1):
        for match in CODE_PATH.finditer(line):
            path = match.group(1).split("::")[0].rstrip(".,:;)")
            if not (root / path).exists():
                missing.append(f"{page.name}:{number}: {path}")
    return missing


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_module_paths_the_docs_name_exist(page):
    assert named_paths_missing(page) == []


def test_a_moved_module_is_caught(tmp_path):
    (tmp_path / "oel_hpc").mkdir()
    (tmp_path / "oel_hpc" / "slurm.py").write_text("")
    page = tmp_path / "page.md"
    page.write_text("See `oel_hpc/slurm.py` and `oel_hpc/megatron/trainer.py`.\n")
    assert named_paths_missing(page, tmp_path) == ["page.md:1: oel_hpc/megatron/trainer.py"]
