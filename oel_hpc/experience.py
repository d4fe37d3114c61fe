"""Experience: read from the extractor's answer, appended, capped at a token budget; the experience list.

Two modes (experience.mode). `items`: the items are the answer's lines that start with the marker; the text is one
item per line, each starting with the marker. `free_text`: the whole answer is one item; the text is the answers
a blank line apart. Capping keeps the newest *complete* items: an item is never cut in half, so the text always
holds whole items.

An answer cut off before it was complete is not an answer: a thinking model's response without `</think>` (it
ran out of tokens while reasoning) yields nothing, nor does a free-text answer that hit the token limit; in items
mode a cut-off answer keeps its complete lines only. Such responses are reported as truncated.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from oel_hpc.errors import ConfigError, DamagedInput, MissingInput

THINK_END = "</think>"
MODES = ("items", "free_text")
FREE_TEXT_SEPARATOR = "\n\n"


def answer_part(response: str) -> str:
    """What a thinking model answered after its reasoning; items inside the reasoning are drafts, not answers."""
    return response.rsplit(THINK_END, 1)[-1]


# What counts as an item line in items mode (experience.parse). Whatever the style, items are written back as
# marker lines, so the experience text always reads the same.
PARSE_STYLES = ("marker", "marker_anywhere", "list")
# a Markdown list line: "-", "*", "+" or "•" bullets, "1." / "1)" numbers (a chat model's own way to list things)
_LIST_ITEM = re.compile(r"^(?:[-*+•]|\d{1,3}[.)])\s+(?P<item>\S.*)$")


def parse_items(response: str, marker: str, style: str = "marker") -> list[str]:
    """The items of the answer (after any reasoning), by style:
    - `marker`: every line that starts with the marker (leading spaces allowed) and has text after it;
    - `marker_anywhere`: the marker anywhere in a line, several per line split at each (the authors' rule for
      their "- EXPERIENCE ITEM:" marker);
    - `list`: every Markdown list line, bulleted or numbered, whatever the marker (for small chat models that
      answer with a numbered list however they are asked)."""
    if style not in PARSE_STYLES:
        raise ValueError(f"experience.parse must be one of {PARSE_STYLES}, got {style!r}")
    stripped_marker = marker.strip()
    items = []
    for line in answer_part(response).splitlines():
        line = line.strip()
        if style == "marker":
            parts = [line[len(stripped_marker):]] if line.startswith(stripped_marker) else []
        elif style == "marker_anywhere":
            parts = line.split(stripped_marker)[1:]
        else:
            m = _LIST_ITEM.match(line)
            parts = [m["item"]] if m else []
        items += [p.strip() for p in parts if p.strip()]
    return items


def render(items: Sequence[str], marker: str) -> str:
    return "\n".join(marker + item for item in items)


def keep_newest(items: Sequence[str], max_tokens: int, count_tokens: Callable[[str], int],
                render_items: Callable[[Sequence[str]], str]) -> list[str]:
    """The newest complete items whose rendered text fits in max_tokens (oldest dropped first)."""
    kept: list[str] = []
    for item in reversed(items):
        if count_tokens(render_items([item] + kept)) > max_tokens:
            break
        kept.insert(0, item)
    return kept


def append_capped(items: Sequence[str], new: Sequence[str], marker: str, max_tokens: int,
                  count_tokens: Callable[[str], int]) -> list[str]:
    """items + new in items mode, keeping the newest complete items whose text fits in max_tokens."""
    return keep_newest(list(items) + list(new), max_tokens, count_tokens, lambda xs: render(xs, marker))


@dataclass(frozen=True)
class Reading:
    """What one extractor response gave: its new items, and whether it was cut off (see the module docstring)."""

    items: list[str]
    truncated: bool


@dataclass(frozen=True)
class ExperienceFormat:
    """How experience is read from an answer and written as text, per experience.mode."""

    mode: str = "items"
    marker: str = "- "
    parse: str = "marker"  # items mode: which lines are items (PARSE_STYLES)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"experience mode must be one of {MODES}, got {self.mode!r}")
        if self.parse not in PARSE_STYLES:
            raise ValueError(f"experience.parse must be one of {PARSE_STYLES}, got {self.parse!r}")

    def render(self, items: Sequence[str]) -> str:
        return render(items, self.marker) if self.mode == "items" else FREE_TEXT_SEPARATOR.join(items)

    def read(self, response: str, *, finished: bool, thinking: bool) -> Reading:
        """The new items of one extractor response. `finished`: it ended with EOS, not at max_new_tokens;
        `thinking`: the model reasons in <think>...</think> first (model.thinking)."""
        if thinking and THINK_END not in response:
            return Reading([], truncated=True)  # still reasoning when it stopped: there is no answer
        answer = answer_part(response)
        if self.mode == "free_text":
            if not finished:
                return Reading([], truncated=True)
            return Reading([answer.strip()] if answer.strip() else [], truncated=False)
        if not finished and not answer.endswith("\n"):
            answer = answer.rpartition("\n")[0]  # the last line stopped mid-way
        return Reading(parse_items(answer, self.marker, self.parse), truncated=not finished)

    def append_capped(self, items: Sequence[str], new: Sequence[str], max_tokens: int,
                      count_tokens: Callable[[str], int]) -> list[str]:
        return keep_newest(list(items) + list(new), max_tokens, count_tokens, self.render)


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
        raise MissingInput(list_file, f"experience list {list_file} does not exist (has the gather stage run?)")
    try:
        rows = json.loads(list_file.read_text())
    except ValueError as e:
        raise DamagedInput(list_file, f"experience list {list_file} is not JSON ({e}): it is damaged or cut "
                                      "short; the gather stage that wrote it must be redone") from None
    if not rows:
        raise ConfigError(str(list_file), "the experience list has no entries")
    entries, texts = [], []
    for row in rows if isinstance(rows, list) else [rows]:
        try:
            entry = ExperienceEntry(**row)
        except TypeError:  # not a dict, or not its fields
            raise DamagedInput(list_file, f"experience list {list_file} holds an entry that is not "
                                          f"{{seed, step, path, sha256, tokens}}: {str(row)[:80]}") from None
        path = run_dir / entry.path
        if not path.is_file():
            raise MissingInput(path, f"experience file {path} (listed in {list_file}) does not exist")
        text = path.read_text()
        if sha256_text(text) != entry.sha256:
            raise ConfigError(str(path), f"changed since {list_file} was written (sha256 differs): redo gather (run.overwrite=true)")
        entries.append(entry)
        texts.append(text)
    return entries, texts


def entry_dict(entry: ExperienceEntry) -> dict:
    return asdict(entry)


MAX_SOURCE_BYTES = 64 * 2**20  # an experience list or file larger than this is not one (a typo'd path)
_ROUND_FOLDER = re.compile(r"^round_\d+$")


def read_source(path: Path, key: str = "gather.source") -> list[tuple[Path, str]]:
    """Experience files named by a user: a JSON list as gather writes it, or a text file with one path per line.
    Every file must exist and be UTF-8 text, and at least one must hold an item. A relative path is resolved from
    the list's folder, except in a list gather wrote (<run>/round_<r>/experience_list.json), whose paths are
    relative to its run directory."""
    if path.is_dir():
        raise ConfigError(key, f"experience list {path} is a folder, not a list file")
    if not path.is_file():
        raise ConfigError(key, f"experience list {path} does not exist")
    text = _read_text(path, key, "experience list")
    if text.lstrip().startswith(("[", "{")):
        names = _json_names(path, text, key)
        base = path.parent.parent if _written_by_gather(path) else path.parent
    else:
        names, base = [line.strip() for line in text.splitlines() if line.strip()], path.parent
    if not names:
        raise ConfigError(key, f"experience list {path} has no entries")
    files = []
    for name in names:
        p = Path(name).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise ConfigError(key, f"experience file {p} (listed in {path}) does not exist")
        files.append((p, _read_text(p, key, f"experience file (listed in {path})")))
    if not any(t.strip() for _, t in files):
        raise ConfigError(key, f"every experience file listed in {path} is empty")
    return files


def _written_by_gather(path: Path) -> bool:
    return path.name == "experience_list.json" and bool(_ROUND_FOLDER.match(path.parent.name))


def _read_text(path: Path, key: str, what: str) -> str:
    """A file that must be UTF-8 text, in one line of error otherwise."""
    if path.stat().st_size > MAX_SOURCE_BYTES:
        raise ConfigError(key, f"{what} {path} is {path.stat().st_size} bytes, more than any experience text "
                          f"({MAX_SOURCE_BYTES // 2**20} MiB): not an experience file?")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(key, f"{what} {path} is not UTF-8 text (a binary file?)") from None
    if "\0" in text:
        raise ConfigError(key, f"{what} {path} holds NUL bytes (a binary file?)")
    return text


def _json_names(path: Path, text: str, key: str) -> list[str]:
    """The `path` of every row of a JSON experience list."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(key, f"experience list {path} is not valid JSON ({e.msg} at line {e.lineno}; cut "
                          "short?)") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and isinstance(r.get("path"), str) for r in rows):
        raise ConfigError(key, f"experience list {path} must be a JSON list of objects with a \"path\" (as gather "
                          "writes it), or a text file with one path per line")
    return [r["path"] for r in rows]
