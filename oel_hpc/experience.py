"""Experience items: parsed from the extractor's answer by their marker, appended, capped at a token budget.

The accumulated experience is a list of items; its text is one item per line, each line starting with the marker.
Capping keeps the newest *complete* items: an item is never cut in half, so the text always parses back to the
same items.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

THINK_END = "</think>"


class EmptyExperience(RuntimeError):
    """Every experience is empty: distilling it would train on a loss that is identically zero."""


def answer_part(response: str) -> str:
    """What a thinking model answered after its reasoning; items inside the reasoning are drafts, not answers."""
    return response.rsplit(THINK_END, 1)[-1]


def parse_items(response: str, marker: str) -> list[str]:
    """Every line of the answer that starts with the marker (leading spaces allowed) and has text after it."""
    stripped_marker = marker.strip()
    items = []
    for line in answer_part(response).splitlines():
        line = line.strip()
        if line.startswith(stripped_marker):
            item = line[len(stripped_marker):].strip()
            if item:
                items.append(item)
    return items


def render(items: Sequence[str], marker: str) -> str:
    return "\n".join(marker + item for item in items)


def append_capped(items: Sequence[str], new: Sequence[str], marker: str, max_tokens: int,
                  count_tokens: Callable[[str], int]) -> list[str]:
    """items + new, keeping the newest complete items whose text fits in max_tokens (oldest dropped first)."""
    merged = list(items) + list(new)
    kept: list[str] = []
    for item in reversed(merged):
        if count_tokens(render([item] + kept, marker)) > max_tokens:
            break
        kept.insert(0, item)
    return kept


@dataclass
class ExperienceEntry:
    """One row of experience_list.json; `path` is relative to the run directory so a run can move."""

    seed: int
    step: int
    path: str
    sha256: str
    tokens: int


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_experience_list(list_file: Path, run_dir: Path) -> tuple[list[ExperienceEntry], list[str]]:
    """Entries and their texts; a missing list, a missing or altered file, or an empty list is an error."""
    if not list_file.is_file():
        raise FileNotFoundError(f"experience list {list_file} does not exist (has the gather stage run?)")
    rows = json.loads(list_file.read_text())
    if not rows:
        raise ValueError(f"experience list {list_file} has no entries")
    entries, texts = [], []
    for row in rows:
        entry = ExperienceEntry(**row)
        path = run_dir / entry.path
        if not path.is_file():
            raise FileNotFoundError(f"experience file {path} (listed in {list_file}) does not exist")
        text = path.read_text()
        if sha256_text(text) != entry.sha256:
            raise ValueError(f"experience file {path} changed since {list_file} was written (sha256 differs)")
        entries.append(entry)
        texts.append(text)
    return entries, texts


def entry_dict(entry: ExperienceEntry) -> dict:
    return asdict(entry)


def read_source(path: Path, key: str = "gather.source") -> list[tuple[Path, str]]:
    """Experience files named by a user: a JSON list as gather writes it (paths relative to the list's folder or
    absolute) or a text file with one path per line. Every file must exist and at least one must hold an item."""
    from oel_hpc.config import ConfigError

    if not path.is_file():
        raise ConfigError(key, f"experience list {path} does not exist")
    text = path.read_text()
    try:
        names = [row["path"] for row in json.loads(text)]
    except (json.JSONDecodeError, TypeError, KeyError):
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise ConfigError(key, f"experience list {path} has no entries")
    files = []
    for name in names:
        p = Path(name).expanduser()
        p = p if p.is_absolute() else path.parent / p
        if not p.is_file():
            raise ConfigError(key, f"experience file {p} (listed in {path}) does not exist")
        files.append((p, p.read_text()))
    if not any(t.strip() for _, t in files):
        raise ConfigError(key, f"every experience file listed in {path} is empty")
    return files
