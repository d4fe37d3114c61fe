"""The run directory (docs/run-directory.md): where every file lives, atomic writes, and DONE markers.

Every write goes to a temporary file in the same folder and is renamed into place, so a crash or a preempted
job never leaves a half-written file behind. A DONE marker holds the stage's config hash and the sha256 of what
it wrote; its presence is what "finished" means.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional


def write_bytes_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def this_host() -> str:
    """The short host name, reduced to letters, digits and dashes (safe inside a file name)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0]) or "host"


def unique_suffix() -> str:
    """`<host>.<pid>.<random>`: a temporary name no other process picks, naming the process that made it (so a
    cleaner can tell a dead writer's leftovers: see train/checkpoint.remove_stale_tmp)."""
    return f"{this_host()}.{os.getpid()}.{secrets.token_hex(4)}"


def replace_dir_atomic(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written folder into place; an old one is moved aside (under a name unique to this process)
    and removed after. Two processes publishing the same folder at once never remove each other's: when the
    other's rename lands between ours, theirs stays and ours is discarded (both hold the same thing)."""
    old = final_dir.with_name(f".{final_dir.name}.{unique_suffix()}.old")
    try:
        os.replace(final_dir, old)
    except FileNotFoundError:
        pass
    try:
        os.replace(tmp_dir, final_dir)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final_dir.is_dir():
            raise
        shutil.rmtree(tmp_dir, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunPaths:
    """Every path of one run; records store paths relative to `root`."""

    root: Path

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.root))

    def display(self, path) -> str:
        """Relative to the run directory when inside it (records stay valid when a run moves), else as given."""
        try:
            return self.rel(Path(path))
        except ValueError:
            return str(path)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    def round(self, r: int) -> Path:
        return self.root / f"round_{r}"

    # extract
    def seed_dir(self, r: int, seed: int) -> Path:
        return self.round(r) / "extract" / f"seed_{seed}"

    def experience(self, r: int, seed: int, step: int) -> Path:
        return self.seed_dir(r, seed) / f"experience_{step}.txt"

    # gather
    def experience_list(self, r: int) -> Path:
        return self.round(r) / "experience_list.json"

    # deploy
    def deploy_dir(self, r: int) -> Path:
        return self.round(r) / "deploy"

    def deploy_step(self, r: int, step: int) -> Path:
        return self.deploy_dir(r) / f"step_{step}.jsonl"

    # consolidate
    def consolidate_dir(self, r: int) -> Path:
        return self.round(r) / "consolidate"

    def ckpt_dir(self, r: int) -> Path:
        return self.consolidate_dir(r) / "ckpt"

    def ckpt(self, r: int, step: int) -> Path:
        return self.ckpt_dir(r) / f"step_{step}"

    def hf(self, r: int) -> Path:
        return self.consolidate_dir(r) / "hf"

    def metrics(self, r: int) -> Path:
        return self.consolidate_dir(r) / "metrics.jsonl"

    # evaluate
    def eval_dir(self, r: int) -> Path:
        return self.round(r) / "eval"

    def eval_result(self, r: int, step: int) -> Path:
        return self.eval_dir(r) / f"step_{step}.json"

    # DONE markers: one per task, so array tasks finish independently
    def done(self, r: int, stage: str, task: Optional[int] = None) -> Path:
        if stage == "extract":
            return self.seed_dir(r, task) / "DONE"
        if stage == "evaluate":
            return self.eval_dir(r) / f"DONE.step_{task}"
        folder = {"gather": self.round(r) / "gather", "deploy": self.deploy_dir(r),
                  "consolidate": self.consolidate_dir(r)}[stage]
        return folder / "DONE"

    def started(self, r: int, stage: str, task: Optional[int] = None) -> Path:
        """Written when a task starts (the config hash it runs under), removed when its DONE is written."""
        done = self.done(r, stage, task)
        return done.with_name(done.name + ".started")


def read_done(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


# How stage hashes are made (pipeline.STAGE_KEYS): 2 = each stage hashes exactly the keys it reads. A DONE marker
# without it was written by an older oel_hpc, whose hashes cover other keys; such a stage reads as "changed".
HASH_SCHEME = 2


def mark_done(paths: RunPaths, done_path: Path, stage_hash: str, outputs: Iterable[Path]) -> None:
    write_json_atomic(done_path, {
        "config_hash": stage_hash,
        "hash_scheme": HASH_SCHEME,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "outputs": {paths.rel(p): sha256_file(p) for p in sorted(outputs)},
    })
