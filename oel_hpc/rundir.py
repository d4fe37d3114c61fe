"""The run directory (docs/run-directory.md): where every file lives, atomic writes, and DONE markers.

Every write goes to a temporary file in the same folder and is renamed into place, so a crash or a preempted
job never leaves a half-written file behind. A DONE marker holds the stage's config hash and a record of each file
it wrote (size, mtime, sha256, JSONL rows); it means "finished" while those files match it (oel_hpc/verify.py).
Files and folders get the modes the umask gives (run.umask, and run.group for a shared project folder), as if
created with open() and mkdir().
"""
from __future__ import annotations

import errno
import grp
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from oel_hpc.errors import ConfigError, DamagedInput
from oel_hpc.verify import OUTPUTS_SCHEME, record

# ---------------------------------------------------------------------------------------------------------------
# Modes. mkstemp and mkdtemp make 0600 files and 0700 folders whatever the umask, which would hide a run's results
# from colleagues; everything written here gets the mode open() and mkdir() would give it instead.


_umask_fallback: Optional[int] = None  # where /proc does not show it: as first read, or as apply_umask set it


def current_umask() -> int:
    """The process's umask: read from /proc on Linux (no race, always current); elsewhere read once by setting it
    (os.umask's only way: racy should another thread create a file meanwhile) and remembered."""
    global _umask_fallback
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    if _umask_fallback is None:
        _umask_fallback = os.umask(0o077)
        os.umask(_umask_fallback)
    return _umask_fallback


def file_mode() -> int:
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    return 0o777 & ~current_umask()


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """A new uniquely named folder in `parent` with the mode mkdir would give it (keeping the setgid bit it
    inherits from a run.group folder)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, dir_mode() | (tmp.stat().st_mode & stat.S_ISGID))
    return tmp


def default_modes(folder: Path) -> None:
    """Give `folder` and everything in it the modes open() and mkdir() would: safetensors, like mkstemp, writes
    0600 whatever the umask. For a folder written in full before it is moved into place (an export)."""
    umask = current_umask()
    for p in [folder, *folder.rglob("*")]:
        if p.is_symlink():
            continue
        st = p.stat()
        if p.is_dir():
            wanted = (0o777 & ~umask) | (st.st_mode & stat.S_ISGID)
        else:  # an executable stays one
            wanted = (0o666 | (st.st_mode & 0o111)) & ~umask
        if stat.S_IMODE(st.st_mode) != wanted:
            os.chmod(p, wanted)


_UMASK = re.compile(r"^0[0-7]{3}$")


def parse_umask(value: str) -> int:
    # four digits, so that a YAML file's bare 0027 (read by YAML as the number 23) is refused, not taken as 0o23
    if not _UMASK.match(str(value)):
        raise ConfigError("run.umask", f"must be four octal digits from 0000 to 0777 such as '0002', got "
                          f"'{value}' (in a YAML file, quote it: a bare 0022 is read as the number 18)")
    return int(str(value), 8)


def apply_umask(value: Optional[str]) -> None:
    """Set the process's umask to run.umask (null: leave it): every entry point that writes into a run calls this
    first, and child processes (sbatch, hence the jobs; torchrun's ranks) inherit it."""
    global _umask_fallback
    if value is not None:
        _umask_fallback = parse_umask(value)
        os.umask(_umask_fallback)


def group_id(name: str) -> int:
    """run.group's id; a ConfigError if there is no such group or this user is not in it."""
    try:
        gid = grp.getgrnam(str(name)).gr_gid
    except KeyError:
        raise ConfigError("run.group", f"no group '{name}' on this machine") from None
    if gid != os.getegid() and gid not in os.getgroups():
        try:
            user = pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:  # a container without a passwd entry for this uid
            user = f"uid {os.geteuid()}"
        raise ConfigError("run.group", f"user '{user}' is not in group '{name}' (see `id`)")
    return gid


def share_run_dir(root: Path, umask: Optional[str], group: Optional[str]) -> None:
    """Create the run directory under run.umask; with run.group, give it that group and the setgid bit, so every
    file and folder made in it later belongs to the group (what was already there keeps its group)."""
    apply_umask(umask)
    root.mkdir(parents=True, exist_ok=True)
    if group is None:
        return
    gid = group_id(group)
    try:
        if root.stat().st_gid != gid:
            os.chown(root, -1, gid)
        mode = stat.S_IMODE(root.stat().st_mode)  # after chown, which may clear the setgid bit
        if not mode & stat.S_ISGID:
            os.chmod(root, mode | stat.S_ISGID)
    except OSError as e:
        raise ConfigError("run.group", f"cannot give {root} the group '{group}': {e.strerror}") from None


# ---------------------------------------------------------------------------------------------------------------
# Atomic writes


def write_bytes_atomic(path: Path, data: bytes, durable: bool = True) -> None:
    """`durable=False`: no fsync (a record rewritten often that a crash may leave a version behind, never torn)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str, durable: bool = True) -> None:
    write_bytes_atomic(path, text.encode(), durable)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a JSONL file; a line that is not JSON (a file cut mid-row, damaged) is an error naming the file."""
    rows = []
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise DamagedInput(path, f"{path} is not text ({e.reason} at byte {e.start}): the file is damaged") from None
    for n, line in enumerate(text.split("\n"), 1):  # "\n" only: what verify counts as rows
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise DamagedInput(path, f"{path} line {n} is not JSON ({e}): the file is damaged or cut "
                                         "short") from None
    return rows


def read_json(path: Path) -> Any:
    """A JSON file another task wrote; one that does not parse is an error naming it."""
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise DamagedInput(path, f"{path} is not JSON ({e}): the file is damaged or cut short") from None


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

    def progress(self, r: int, stage: str, task: Optional[int] = None) -> Path:
        """A task's progress record (progress.jsonl: one JSON row per unit of work done, rewritten atomically),
        beside its DONE marker; what the dashboard's step k/K, ETA and curves read while the task runs."""
        done = self.done(r, stage, task)
        return done.with_name("progress.jsonl" if done.name == "DONE" else f"progress.{done.name[5:]}.jsonl")

    def started(self, r: int, stage: str, task: Optional[int] = None) -> Path:
        """Written when a task starts (the config hash it runs under), removed when its DONE is written."""
        done = self.done(r, stage, task)
        return done.with_name(done.name + ".started")


def read_done(path: Path) -> Optional[dict]:
    """A DONE marker; None when there is none. One that cannot be read is DamagedInput."""
    if not path.is_file():
        return None
    done = read_json(path)
    if not isinstance(done, dict) or not isinstance(done.get("config_hash"), str) or not isinstance(
            done.get("outputs", {}), dict):
        raise DamagedInput(path, f"{path} is not a marker (no config_hash, or outputs not a record of files)")
    return done


def read_started(path: Path) -> Optional[dict]:
    """A `.started` marker; None when there is none. One that cannot be read names no config (`config_hash` None):
    the outputs of that attempt are not resumed."""
    try:
        return read_done(path)
    except DamagedInput:
        return {"config_hash": None}


# How stage hashes are made (pipeline.STAGE_KEYS): 2 = each stage hashes exactly the keys it reads. A DONE marker
# without it was written by an older oel_hpc, whose hashes cover other keys; such a stage reads as "changed".
HASH_SCHEME = 2


def mark_done(paths: RunPaths, done_path: Path, stage_hash: str, outputs: Iterable[Path]) -> None:
    """`outputs_scheme` (verify.OUTPUTS_SCHEME) says how each output is recorded; a marker without it records a
    sha256 per file and nothing else."""
    write_json_atomic(done_path, {
        "config_hash": stage_hash,
        "hash_scheme": HASH_SCHEME,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "outputs_scheme": OUTPUTS_SCHEME,
        "outputs": {paths.rel(p): record(p) for p in sorted(outputs)},
    })
