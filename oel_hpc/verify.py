"""Outputs are verified, not trusted: the files a finished task recorded in its DONE marker are checked against
that record wherever the task counts as done (a launcher's plan, "Nothing to do", the inputs of the task about to
run, `python -m oel_hpc.status`).

A record (rundir.mark_done) holds each file's size, modification time (ns), sha256 and, for a `.jsonl` file, its
row count. The cheap check: the file exists with its recorded size; its hash is skipped when its mtime is also the
recorded one, unless the file is small (up to SMALL bytes: hashing it costs nothing) or the check is full
(`run.verify=full`, `status --verify`). A file whose mtime changed but whose bytes did not (a copy without kept
times, a touch) passes: its hash is computed and matches. What a cheap check misses: a large file changed in place
to the same size with its mtime put back; a full check misses nothing.

Markers from before records had sizes (no `outputs_scheme`: `{path: sha256}`) are checked for existence, and for
their hash when the file is small or the check is full.

Torch- and omegaconf-free: `python -m oel_hpc.status` uses it on a login node.
"""
from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SMALL = 1 << 20  # bytes: files up to this size are always hashed (every record, experience and deploy file of a
# tiny run, the JSON and text records of a real one); larger ones (weights, long JSONL) only when their mtime moved

# The format of a DONE marker's "outputs": 2 = {path: {size, mtime_ns, sha256[, rows]}}; absent = {path: sha256}.
OUTPUTS_SCHEME = 2

_BLOCK = 1 << 20
_verified: dict[tuple, str] = {}  # (path, device, inode, size, mtime_ns, ctime_ns) → sha256 hashed in this process


@dataclass(frozen=True)
class Damage:
    """One recorded file that does not match its record."""

    path: str  # as the DONE marker names it: relative to the run directory
    reason: str  # a phrase that follows the path: "is missing", "differs from ..."

    def __str__(self) -> str:
        return f"{self.path} {self.reason}"

    def at(self, root: Path) -> str:
        return f"{Path(root) / self.path} {self.reason}"


def digest(path: Path) -> tuple[str, int, Optional[int]]:
    """(sha256, size, rows): rows counts the non-blank lines of a .jsonl file (what rundir.read_jsonl returns)."""
    h, rows, size = hashlib.sha256(), 0, 0
    count = path.suffix == ".jsonl"
    with open(path, "rb") as f:
        if count:
            for line in f:
                h.update(line)
                size += len(line)
                rows += bool(line.strip())
        else:
            for block in iter(lambda: f.read(_BLOCK), b""):
                h.update(block)
                size += len(block)
    return h.hexdigest(), size, rows if count else None


def record(path: Path) -> dict:
    """What a DONE marker records of one output file."""
    before = path.stat()
    sha, size, rows = digest(path)
    entry = {"size": size, "mtime_ns": before.st_mtime_ns, "sha256": sha}
    if rows is not None:
        entry["rows"] = rows
    _remember(path, os.stat(path), sha)
    return entry


def _key(path: Path, st: os.stat_result) -> tuple:
    return (str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _remember(path: Path, st: os.stat_result, sha: str) -> None:
    _verified[_key(path, st)] = sha


def _sha256(path: Path, st: os.stat_result) -> str:
    """The file's sha256, hashed once per process while its size, mtime and ctime stay the same."""
    key = _key(path, st)
    if key not in _verified:
        _verified[key] = digest(path)[0]
    return _verified[key]


def check_file(path: Path, rel: str, entry, full: bool = False, hash_small: bool = True) -> Optional[Damage]:
    """`entry`: the file's record (a dict, or a bare sha256 from an older marker). None when it matches."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Damage(rel, "is missing")
    except OSError as e:
        return Damage(rel, f"cannot be read ({e.strerror})")
    if isinstance(entry, str):  # an older marker: a sha256 alone
        entry = {"sha256": entry}
    if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str):
        return Damage(rel, "has no readable record in its DONE marker")
    if not stat.S_ISREG(st.st_mode):
        return Damage(rel, "is not a file")
    size = entry.get("size")
    if size is not None and st.st_size != size:
        return Damage(rel, _size_reason(Path(path), st.st_size, entry))
    skip_hash = (not full and (st.st_size > SMALL or not hash_small)
                 and (size is None or st.st_mtime_ns == entry.get("mtime_ns")))  # older markers: existence only
    if skip_hash:
        return None
    try:
        sha = _sha256(Path(path), st)
    except OSError as e:
        return Damage(rel, f"cannot be read ({e.strerror})")
    if sha != entry["sha256"]:
        return Damage(rel, "differs from the sha256 its DONE marker records")
    return None


def _size_reason(path: Path, actual: int, entry: dict) -> str:
    if entry.get("rows") is not None:
        try:
            rows = digest(path)[2]
        except OSError:
            rows = None
        if rows is not None:
            return (f"has {rows} rows ({actual} bytes) where its DONE marker records {entry['rows']} rows "
                    f"({entry['size']} bytes)")
    return f"is {actual} bytes where its DONE marker records {entry['size']}"


def check_outputs(root: Path, done: dict, full: bool = False, hash_small: bool = True) -> list[Damage]:
    """Every file a DONE marker records that does not match its record ([] when all do). `root`: the run
    directory the marker's paths are relative to; `full`: hash every file, whatever its size and mtime;
    `hash_small=False`: small files too are hashed only when their mtime moved (the dashboard: thousands of tasks'
    experience files per refresh)."""
    outputs = done.get("outputs") or {}  # a marker that records no files (rundir.read_done refuses a non-record)
    bad = []
    root = str(root)
    for rel, entry in outputs.items():
        damage = check_file(os.path.join(root, rel), rel, entry, full, hash_small)  # str paths: thousands per call
        if damage is not None:
            bad.append(damage)
    return bad


def summary(damage: list[Damage]) -> str:
    """The first damaged file, and how many more."""
    more = f" (and {len(damage) - 1} more files)" if len(damage) > 1 else ""
    return f"{damage[0]}{more}"
