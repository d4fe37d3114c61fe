"""One writer per run: file locks in the run directory, taken by whatever writes the run.

Two lock files, both taken with flock(2), never blocking (a second writer is refused at once, in one line that
names the holder), and never deleted: a lock file removed and created again would let two processes each hold
"the" lock, on two different files.

- `run.lock`, the launchers', exclusive: the local launcher holds it for its whole run, the Slurm launcher while it
  submits. Its holder writes its host, pid, start time, command and Slurm job id into it (JSON), so a refused
  command can say who holds the run, and empties it when it lets go.
- `jobs.lock`, the Slurm jobs', shared: every task of a job (`python -m oel_hpc.worker`: the tasks of an array, the
  ranks of a consolidation) holds it while it runs, so the jobs of one run never block each other and a new
  submission of the run (which only takes `run.lock`) is allowed while they run. The local launcher takes it
  exclusively: it refuses to start while a job of the run is running, and a job that starts while a local run
  holds it is refused (its stage is left to the local run).

The kernel drops a process's locks when it dies, SIGKILL included, so a lock whose holder is dead is simply free:
the next command takes it and writes its own details over the dead holder's.

File systems: flock keeps processes apart on a local file system and on NFSv4 (the Linux client maps it onto NFS
byte-range locks, which hold across nodes; an NFS mount with `nolock` keeps them per node, silently). Lustre
supports it across nodes only when mounted with `-o flock` (`-o localflock`: per node; without either, flock fails
with ENOSYS); GPFS supports it. Where the file system refuses locks, the command goes on after one warning line:
nothing keeps two writers apart there.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import shlex
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from oel_hpc.errors import RunInUse
from oel_hpc.log import get_logger
from oel_hpc.slurm import current_job

log = get_logger(__name__)

LAUNCH_LOCK = "run.lock"
JOBS_LOCK = "jobs.lock"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NO_LOCKS = {errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP}  # the file system does not do flock


def _open(path: Path) -> int:
    # 0o666: the umask decides who may read it, as for every file of the run
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)


def _try_lock(fd: int, path: Path, exclusive: bool) -> bool:
    """True when held (or when the file system cannot lock, after a warning); False when another process holds it."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise
        log.warning(f"{path}: the file system does not support file locks ({e.strerror}); nothing keeps a second "
                    "command off this run (on Lustre, mount with -o flock)")
        return True


def _holder(role: str) -> dict:
    return {"role": role, "host": socket.gethostname(), "pid": os.getpid(),
            "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(getattr(sys, "orig_argv", sys.argv)), "slurm_job_id": current_job()}


def read_holder(run_dir: Path) -> Optional[dict]:
    """What the holder of `run.lock` wrote; None when nothing is recorded (free, or a holder still writing)."""
    for _ in range(5):  # a new holder empties the file, then writes: give it a moment
        try:
            text = (run_dir / LAUNCH_LOCK).read_text()
        except FileNotFoundError:
            return None
        try:
            info = json.loads(text)
            if isinstance(info, dict):
                return info
        except ValueError:
            pass
        time.sleep(0.05)
    return None


def in_use_message(run_dir: Path) -> str:
    info = read_holder(run_dir)
    if info is None:
        return f"run directory {run_dir} is in use by another command (its holder has not recorded itself in " \
               f"{LAUNCH_LOCK} yet)"
    command = _CONTROL.sub(lambda m: repr(m.group())[1:-1], str(info.get("command", "?")))  # one line: \n as \\n
    if len(command) > 200:
        command = command[:197] + "..."
    job = f", Slurm job {info['slurm_job_id']}" if info.get("slurm_job_id") else ""
    return (f"run directory {run_dir} is in use by pid {info.get('pid', '?')} on host {info.get('host', '?')} since "
            f"{info.get('since', '?')} ({info.get('role', 'command')}{job}: {command}): wait for it to end, or pick "
            "another run.name")


@contextmanager
def launcher_lock(run_dir: Path, role: str, exclude_jobs: bool = False) -> Iterator[None]:
    """Hold `run.lock` (and, with `exclude_jobs`, `jobs.lock`) exclusively for the body; RunInUse when another
    command holds either. Creates the run directory: check that it may be written (launch/guard.py) first."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LAUNCH_LOCK
    fds = [_open(path)]
    try:
        if not _try_lock(fds[0], path, exclusive=True):
            raise RunInUse(in_use_message(run_dir))
        if exclude_jobs:
            fds.append(_open(run_dir / JOBS_LOCK))
            if not _try_lock(fds[1], run_dir / JOBS_LOCK, exclusive=True):
                raise RunInUse(f"run directory {run_dir} has Slurm jobs running (they hold {JOBS_LOCK}): wait for "
                               f"them to end or cancel them (see python -m oel_hpc.status {run_dir})")
        # written in place, never renamed: the lock lives on this file's inode
        os.ftruncate(fds[0], 0)
        os.pwrite(fds[0], (json.dumps(_holder(role), indent=1) + "\n").encode(), 0)
        os.fsync(fds[0])
        try:
            yield
        finally:
            os.ftruncate(fds[0], 0)  # free: no holder to name
    finally:
        for fd in fds:
            os.close(fd)  # closing the last descriptor of a lock releases it


@contextmanager
def job_lock(run_dir: Path) -> Iterator[None]:
    """Hold `jobs.lock` shared for the body (a task of a Slurm job); RunInUse when a local run holds the run."""
    path = run_dir / JOBS_LOCK
    fd = _open(path)
    try:
        if not _try_lock(fd, path, exclusive=False):
            raise RunInUse(in_use_message(run_dir))
        yield
    finally:
        os.close(fd)
