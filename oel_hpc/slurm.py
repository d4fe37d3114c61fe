"""Everything oel_hpc says to Slurm and reads back, in one place: the command runner (a timeout, a bounded retry of
what is transient), job ids and array specs (written and read), one table of job states, the squeue and sacct
parsers, requeue and node lists.

The launcher (oel_hpc.launch.slurm), the dashboard (oel_hpc.status) and the trainer (train/preemption.py,
train/distributed.py) all use it. It imports nothing heavy (no torch, no omegaconf): `python -m oel_hpc.status`
imports it on a login node, where start-up time is what the user waits for.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from oel_hpc.errors import ConfigError, SlurmError
from oel_hpc.log import get_logger

log = get_logger(__name__)

# ---------------------------------------------------------------------------------------------------------------
# Job states: Slurm's JOB STATE CODES (squeue(1), sacct(1)) → the phase a job is in.

PENDING, RUNNING, FINAL = "pending", "running", "final"
JOB_STATES = {
    # waiting to start (again): it will run unless cancelled
    "PENDING": PENDING, "REQUEUED": PENDING, "REQUEUE_HOLD": PENDING, "REQUEUE_FED": PENDING,
    "RESV_DEL_HOLD": PENDING,
    # holds an allocation: setting up, running, paused, or finishing (COMPLETING: some processes still active,
    # so its outcome, and whether a DONE marker appears, is not known yet)
    "CONFIGURING": RUNNING, "RUNNING": RUNNING, "RESIZING": RUNNING, "SUSPENDED": RUNNING, "STOPPED": RUNNING,
    "SIGNALING": RUNNING, "STAGE_OUT": RUNNING, "COMPLETING": RUNNING,
    # ended (SPECIAL_EXIT: requeued and held by an epilog; it runs again only if a person releases it)
    "COMPLETED": FINAL, "FAILED": FINAL, "CANCELLED": FINAL, "TIMEOUT": FINAL, "NODE_FAIL": FINAL,
    "OUT_OF_MEMORY": FINAL, "BOOT_FAIL": FINAL, "DEADLINE": FINAL, "PREEMPTED": FINAL, "REVOKED": FINAL,
    "SPECIAL_EXIT": FINAL,
}
NEVER_REASONS = {"DependencyNeverSatisfied"}  # a pending job that will never start: an upstream job failed


def phase(state: Optional[str]) -> Optional[str]:
    """PENDING, RUNNING or FINAL; None for a state Slurm does not document (or none)."""
    return JOB_STATES.get((state or "").split(" ")[0])  # sacct writes "CANCELLED by <uid>"


def in_queue(state: Optional[str]) -> bool:
    """Pending or running: the job still counts, whatever it will end as."""
    return phase(state) in (PENDING, RUNNING)


def never_starts(row: dict) -> bool:
    return phase(row.get("state")) == PENDING and row.get("reason") in NEVER_REASONS


# ---------------------------------------------------------------------------------------------------------------
# Job ids and array specs

_JOB = re.compile(r"^(?P<base>\d+)(?:_(?:(?P<task>\d+)|\[(?P<spec>[^\]]*)\]))?$")


def array_spec(tasks: Sequence[int]) -> str:
    """[0, 1, 2, 5, 7, 8] → '0-2,5,7-8' (what --array takes)."""
    parts, tasks = [], sorted(set(tasks))
    i = 0
    while i < len(tasks):
        j = i
        while j + 1 < len(tasks) and tasks[j + 1] == tasks[j] + 1:
            j += 1
        parts.append(str(tasks[i]) if i == j else f"{tasks[i]}-{tasks[j]}")
        i = j + 1
    return ",".join(parts)


def expand_indices(spec: str) -> list[int]:
    """`1,3-5`, `2-8:2` or `0-9%2` (a throttled array) → the array indices."""
    spec = spec.split("%", 1)[0]
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        rng, _, step = part.partition(":")
        lo, _, hi = rng.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1, int(step or 1)))
    return out


DEFAULT_MAX_ARRAY_SIZE = 1001  # Slurm's default MaxArraySize: array indices 0..1000
TASK_OFFSET_VAR = "OEL_TASK_OFFSET"  # a split array's jobs get it: task = SLURM_ARRAY_TASK_ID + offset


@dataclass(frozen=True)
class ArrayPart:
    """One sbatch of an array stage: `tasks` (the real seeds / checkpoint steps) run as array indices
    `task - offset`, every one below MaxArraySize."""
    offset: int
    tasks: list[int]

    def indices(self) -> list[int]:
        return [t - self.offset for t in self.tasks]

    def spec(self, throttle: Optional[int] = None) -> str:
        """--array's value: the indices, `%N` at most N tasks running at once."""
        return array_spec(self.indices()) + (f"%{throttle}" if throttle else "")


def split_array(tasks: Sequence[int], max_array_size: int) -> list[ArrayPart]:
    """The fewest arrays whose indices all stay below `max_array_size` (Slurm refuses an index >= MaxArraySize,
    whatever the number of tasks). Tasks that fit as they are keep offset 0 (the array index is the task);
    each further part starts at its first task (offset = that task, index 0)."""
    if max_array_size < 1:
        raise ValueError(f"max_array_size must be >= 1, got {max_array_size}")
    parts: list[ArrayPart] = []
    for task in sorted(set(tasks)):
        if parts and task - parts[-1].offset < max_array_size:
            parts[-1].tasks.append(task)
        else:
            parts.append(ArrayPart(0 if not parts and task < max_array_size else task, [task]))
    return parts


def job_ref(job: str, task: Optional[int] = None) -> str:
    """How Slurm names a job (`123`) or one task of an array job (`123_4`)."""
    return str(job) if task is None else f"{job}_{task}"


def parse_job_id(text: str) -> Optional[tuple[str, Optional[set[int]]]]:
    """`123` → ('123', None); `123_4` → ('123', {4}); `123_[2-5%2]` → ('123', {2,3,4,5}); not Slurm's → None."""
    m = _JOB.match(str(text).strip())
    if not m:
        return None
    if m["task"] is not None:
        return m["base"], {int(m["task"])}
    if m["spec"] is not None:
        return m["base"], set(expand_indices(m["spec"]))
    return m["base"], None


def current_job(environ: Mapping[str, str] = os.environ) -> Optional[str]:
    """The job this process runs in, as `scontrol requeue` takes it: `<array>_<task>` for an array task (its own
    SLURM_JOB_ID is a different number), else SLURM_JOB_ID; None outside Slurm."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return job_ref(environ["SLURM_ARRAY_JOB_ID"], int(environ["SLURM_ARRAY_TASK_ID"]))
    return environ.get("SLURM_JOB_ID") or None


def seconds_of(text: Optional[str]) -> Optional[int]:
    """Slurm durations: `MM:SS`, `HH:MM:SS`, `D-HH:MM:SS` (sacct, squeue) → seconds."""
    m = re.match(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$", (text or "").strip())
    if not m:
        return None
    d, h, mi, s = (int(g) if g else 0 for g in m.groups())
    return ((d * 24 + h) * 60 + mi) * 60 + s


def parse_settings(text: str) -> dict[str, str]:
    """`scontrol show config` (`Key = Value` lines) or `scontrol show partition -o` (`Key=Value` words on one
    line) → {key: value}."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if " = " in line:
            key, _, value = line.partition(" = ")
            out[key.strip()] = value.strip()
        else:
            for word in line.split():
                key, eq, value = word.partition("=")
                if eq:
                    out[key] = value
    return out


def parse_partitions(text: str) -> list[dict[str, str]]:
    """`scontrol show partition -o`: one {key: value} per partition (one line each)."""
    return [parse_settings(line) for line in text.splitlines() if line.strip().startswith("PartitionName=")]


# ---------------------------------------------------------------------------------------------------------------
# Node lists

_GROUP = re.compile(r"\[([^\[\]]*)\]")


def hostnames(nodelist: str) -> list[str]:
    """A Slurm node list, expanded as `scontrol show hostnames` does: `gpu[01-03,7],cpu1` → gpu01 gpu02 gpu03 gpu7
    cpu1 (a range keeps the zero padding of its first number; several bracket groups in one name multiply). In
    Python, so a rank inside a container (where scontrol is missing) finds its master too."""
    hosts: list[str] = []
    for name in _split_top_level(nodelist.strip()):
        pieces = _GROUP.split(name)  # text, group, text, group, ..., text
        if "[" in "".join(pieces[::2]) or "]" in "".join(pieces[::2]):
            raise SlurmError(f"cannot read the node list {nodelist!r}")
        choices = [[text] if i % 2 == 0 else _expand_group(text, nodelist) for i, text in enumerate(pieces)]
        hosts.extend("".join(parts) for parts in product(*choices))
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    """Split at the commas outside brackets."""
    names, depth, start = [], 0, 0
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            names.append(nodelist[start:i])
            start = i + 1
    names.append(nodelist[start:])
    return [n for n in names if n]


def _expand_group(group: str, nodelist: str) -> list[str]:
    out = []
    for part in group.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise SlurmError(f"cannot read the node list {nodelist!r}")
        out.extend(f"{n:0{len(lo)}d}" for n in range(int(lo), int(hi or lo) + 1))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Running Slurm's commands

TIMEOUT_S = 60.0
ATTEMPTS = 3
BACKOFF_S = (2.0, 5.0)  # the waits before the 2nd and 3rd attempt

# Two kinds of transient failure, told apart by what Slurm may have done:
# - REFUSED: the request certainly did not take effect (no connection was made, or slurmctld answered "not now").
#   Any command may be sent again.
# - UNKNOWN: the request may have arrived and been carried out, only the answer was lost (our timeout, a socket
#   timeout mid-exchange). Only a command that changes nothing (squeue, sacct) is sent again.
# So sbatch is retried only when Slurm certainly refused: a job submitted twice would run twice (and a second
# array of the same seeds would race the first on the same output folder); an sbatch whose answer is lost ends
# the submission with an error naming the risk instead. The same rule keeps `scancel` and `scontrol requeue`
# (a second requeue of a job that already restarted would kill its new attempt) from being sent twice.
_REFUSED = re.compile(r"unable to contact slurm controller|connection refused|resource temporarily unavailable"
                      r"|temporarily unable to accept|try again|backup controller in standby", re.IGNORECASE)
_UNKNOWN = re.compile(r"socket timed out|zero bytes were transmitted|unable to receive message"
                      r"|unable to send message|connection reset", re.IGNORECASE)


@dataclass
class Answer:
    returncode: int
    stdout: str
    stderr: str


Execute = Callable[[list[str], float, Optional[Path]], Answer]  # argv, timeout (s), cwd; raises TimeoutExpired


def run_command(argv: list[str], timeout: float, cwd: Optional[Path] = None) -> Answer:
    """Run a command found on PATH (tests put stand-ins for Slurm's commands there)."""
    r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)
    return Answer(r.returncode, r.stdout, r.stderr)


def transient(text: str) -> Optional[str]:
    """'refused', 'unknown' (see above) or None: a failure that another try would not change."""
    if _UNKNOWN.search(text):
        return "unknown"
    if _REFUSED.search(text):
        return "refused"
    return None


class Runner:
    """Runs one Slurm command: a timeout per attempt, and up to `attempts` attempts while the failure is transient
    (with `backoff_s` between them). Raises SlurmError naming the command and Slurm's answer."""

    def __init__(self, timeout_s: float = TIMEOUT_S, attempts: int = ATTEMPTS,
                 backoff_s: Sequence[float] = BACKOFF_S, cwd: Optional[Path] = None,
                 execute: Optional[Execute] = None, sleep: Callable[[float], None] = time.sleep):
        self.timeout_s, self.attempts, self.backoff_s, self.cwd = timeout_s, max(1, attempts), backoff_s, cwd
        self.execute, self.sleep = execute, sleep

    def __call__(self, argv: list[str], *, changes: bool, what: Optional[str] = None,
                 nothing_if: Optional[str] = None) -> str:
        """stdout of `argv`. `changes`: the command changes Slurm's state (sbatch, scancel, scontrol requeue), so
        it is repeated only when Slurm certainly refused it. `nothing_if`: a part of an error answer that means
        "nothing to show" (squeue's "Invalid job id" once every id has left slurmctld's memory): "" then."""
        what = what or argv[0]
        run = self.execute
        if run is None:
            if shutil.which(argv[0]) is None:
                raise SlurmError(f"{argv[0]} not found: run this on a Slurm login node (or start the test "
                                 "cluster: tools/slurm/start.sh)")
            run = run_command
        for attempt in range(1, self.attempts + 1):
            try:
                answer = run(argv, self.timeout_s, self.cwd)
            except subprocess.TimeoutExpired:
                kind, said = "unknown", f"no answer within {self.timeout_s:g} s (is slurmctld up?)"
            except OSError as e:
                raise SlurmError(f"{what} cannot run: {e}") from None
            else:
                if answer.returncode == 0:
                    return answer.stdout
                text = answer.stderr.strip() or answer.stdout.strip()
                if nothing_if and nothing_if in text:
                    return ""
                lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
                said = lines[-1] if lines else f"exit status {answer.returncode}"
                kind = transient(text)
            again = kind == "refused" or (kind == "unknown" and not changes)
            if not again or attempt == self.attempts:
                break
            wait = self.backoff_s[min(attempt - 1, len(self.backoff_s) - 1)] if self.backoff_s else 0.0
            log.warning(f"{what}: {said}; trying again in {wait:g} s (attempt {attempt + 1} of {self.attempts})")
            self.sleep(wait)
        if kind == "unknown" and changes:
            raise SlurmError(f"{what}: {said}; Slurm may have carried it out, so it was not repeated (look at "
                             "squeue before running the command again)")
        tries = f" (after {attempt} attempts)" if attempt > 1 else ""
        raise SlurmError(f"{what} failed{tries}: {said}")


# ---------------------------------------------------------------------------------------------------------------
# Reading squeue and sacct

# %L: time left before the time limit (running); %S: actual or expected start (pending: Slurm's estimate)
SQUEUE_FORMAT = "%i|%T|%M|%R|%N|%L|%S"
SACCT_FIELDS = ("JobID", "JobName", "State", "Elapsed", "ExitCode", "NodeList", "Start", "End", "Submit")
_SACCT_NEEDED = 8  # rows without the last fields (Submit) still read


def _time(text: Optional[str]) -> Optional[str]:
    return text if text and text not in ("Unknown", "None", "N/A") else None


def _expanded(rows: dict, job_id: str, info: dict) -> None:
    parsed = parse_job_id(job_id)
    if parsed is None:
        return
    base, tasks = parsed
    for task in sorted(tasks) if tasks is not None else [None]:
        rows[(base, task)] = dict(info)


def parse_squeue(out: str) -> dict:
    """{(job, task or None): {state, reason, elapsed_s, node, time_left_s, expected_start}} from `squeue -o
    SQUEUE_FORMAT`; a compressed pending array (`123_[2-5%2]`) becomes one row per task. `expected_start`: %S of a
    pending job (Slurm's estimate, None when it has none); `time_left_s`: %L of a running job."""
    rows: dict = {}
    for line in out.splitlines():
        values = line.strip().split("|")
        if len(values) < 5:
            continue
        job_id, state, elapsed, reason_or_nodes, nodes = values[:5]
        left, start = (values[5:7] + [None, None])[:2]
        reason = reason_or_nodes[1:-1] if reason_or_nodes.startswith("(") else None  # %R: (reason) or nodes
        pending = phase(state) == PENDING
        _expanded(rows, job_id, {"state": state, "reason": reason if reason not in ("None", "") else None,
                                 "elapsed_s": seconds_of(elapsed), "node": nodes or None,
                                 "time_left_s": None if pending else seconds_of(left),
                                 "expected_start": _time(start) if pending else None})
    return rows


def parse_sacct(out: str) -> dict:
    """{(job, task or None): row} from `sacct -X -n -P --format=<SACCT_FIELDS>`; compressed pending rows
    (`123_[2-5]`) are expanded; a bare `123` row of an array (sacct shows one briefly right after the tasks ran)
    stays under task None. Of several rows of one job (a requeued job with --duplicates) the last, newest, wins;
    `restarts` counts the rows before it (each requeue leaves one)."""
    rows: dict = {}
    for line in out.splitlines():
        values = line.split("|")
        if len(values) < _SACCT_NEEDED:
            continue
        row = dict(zip(SACCT_FIELDS, values))
        node = row["NodeList"] if row["NodeList"] not in ("", "None assigned", "(null)") else None
        parsed = parse_job_id(row["JobID"])
        one = parsed is not None and (parsed[1] is None or len(parsed[1]) == 1)  # not a compressed pending row
        earlier = rows.get((parsed[0], min(parsed[1]) if parsed[1] else None)) if one else None
        _expanded(rows, row["JobID"], {
            "restarts": earlier["restarts"] + 1 if earlier is not None else 0,
            "state": row["State"].split(" ")[0], "reason": None, "elapsed_s": seconds_of(row["Elapsed"]),
            "exit_code": row["ExitCode"] or None, "node": node, "name": row["JobName"] or None,
            "start": _time(row["Start"]), "end": _time(row["End"]), "submit": _time(row.get("Submit"))})
    return rows


# ---------------------------------------------------------------------------------------------------------------
# The commands

class Slurm:
    """The Slurm commands oel_hpc runs, through one Runner. Counts its sbatch calls (tests and the benchmark read
    them)."""

    def __init__(self, runner: Optional[Runner] = None):
        self.run = runner or Runner()
        self.sbatch_calls: list[list[str]] = []

    def sbatch(self, script: Path, array: Optional[str] = None, dependency: Sequence[str] = (),
               task_offset: Optional[int] = None) -> str:
        """Submit `script`; returns the job id. `--parsable` makes the answer the id alone (`<id>[;<cluster>]`).
        `task_offset` (arrays): passed to the jobs as OEL_TASK_OFFSET, always, so none inherits a stale one."""
        argv = ["sbatch", "--parsable"]
        if array is not None:
            argv.append(f"--array={array}")
        if task_offset is not None:
            argv.append(f"--export=ALL,{TASK_OFFSET_VAR}={int(task_offset)}")
        if dependency:
            argv.append("--dependency=afterok:" + ":".join(dependency))
        argv.append(str(script))
        self.sbatch_calls.append(argv)
        out = self.run(argv, changes=True, what=f"sbatch {Path(script).name}").strip()
        job_id = out.split(";")[0]
        if not job_id.isdigit():
            raise SlurmError(f"sbatch {Path(script).name} answered {out!r}, not a job id")
        return job_id

    def queue(self, job_ids: Sequence[str]) -> dict:
        """What slurmctld knows of these jobs (parse_squeue's rows); `-t all` keeps the tasks that ended in the
        last MinJobAge seconds, which sacct may not show yet."""
        if not job_ids:
            return {}
        out = self.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", SQUEUE_FORMAT],
                       changes=False, nothing_if="Invalid job id")  # every id has left slurmctld's memory
        return parse_squeue(out)

    def accounting(self, job_ids: Sequence[str], duplicates: bool = False) -> dict:
        """sacct's rows of these jobs (parse_sacct's), one per job or array task (-X: no steps). `duplicates`
        (-D): also the rows a requeue left, which parse_sacct counts as `restarts`."""
        if not job_ids:
            return {}
        argv = ["sacct", "-X", "-n", "-P", *(["-D"] if duplicates else []), "-j", ",".join(job_ids),
                "--format=" + ",".join(SACCT_FIELDS)]
        out = self.run(argv, changes=False)
        return parse_sacct(out)

    def show_config(self) -> dict[str, str]:
        """`scontrol show config`: the controller's settings (MaxArraySize, MaxJobCount, ...)."""
        return parse_settings(self.run(["scontrol", "show", "config"], changes=False,
                                       what="scontrol show config"))

    def partitions(self, name: Optional[str] = None) -> list[dict[str, str]]:
        """`scontrol show partition [<name>] -o`: that partition's settings, or every partition's."""
        argv = ["scontrol", "show", "partition", *([name] if name else []), "-o"]
        return parse_partitions(self.run(argv, changes=False, what=" ".join(argv[:3])))

    def cancel(self, refs: Sequence[str]) -> None:
        if refs:
            self.run(["scancel", *refs], changes=True)

    def requeue(self, ref: str) -> None:
        """`scontrol requeue <ref>`: Slurm ends the running job and queues it again under the same id (the job
        needs `--requeue` or the cluster's JobRequeue=1)."""
        self.run(["scontrol", "requeue", str(ref)], changes=True, what=f"scontrol requeue {ref}")


# ---------------------------------------------------------------------------------------------------------------
# Values written into sbatch scripts: checked when the config is validated, before anything is rendered.

# Characters an #SBATCH value may carry without quotes (sbatch splits on blanks, strips quotes, and a '#'
# starts a comment).
_SBATCH_BARE = re.compile(r"^[A-Za-z0-9._,:/=@+%-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _no_control(key: str, value: str) -> None:
    if _CONTROL.search(value):
        raise ConfigError(key, f"{value!r} contains a newline or another control character")


def sbatch_value(key: str, value) -> str:
    """`value` as sbatch's directive parser reads it back verbatim."""
    value = str(value)
    _no_control(key, value)
    if _SBATCH_BARE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_setup_line(key: str, line: str) -> None:
    """A `cluster.setup` line runs as written, but must be one complete shell command line."""
    _no_control(key, line)
    if (len(line) - len(line.rstrip("\\"))) % 2 == 1:
        raise ConfigError(key, f"{line!r} ends with a backslash (it would join the next line of the script)")
    if "<<" in line.replace("<<<", ""):
        raise ConfigError(key, f"{line!r}: here-documents are not allowed in setup lines")
    r = subprocess.run(["bash", "-n", "-c", line], capture_output=True, text=True, timeout=30)
    if r.returncode != 0 or r.stderr.strip():
        detail = (r.stderr.strip().splitlines() or ["syntax error"])[-1]
        raise ConfigError(key, f"{line!r} is not one complete shell command ({detail})")


def check_sbatch_line(key: str, line: str) -> None:
    """A `cluster.extra_sbatch` entry: one sbatch option (`--mail-type=END`), rendered as `#SBATCH <line>`."""
    _no_control(key, line)
    if not line.startswith("-"):
        raise ConfigError(key, f"{line!r} is not an sbatch option (it must start with '-', e.g. --mail-type=END)")


def check_path_for_slurm(key: str, path: str) -> None:
    """Paths that sbatch expands in --output (and that Slurm must find again) must not hold '%' or controls."""
    _no_control(key, path)
    if "%" in path:
        raise ConfigError(key, f"{path!r} contains '%' (sbatch would expand it in the log file name)")


def check_bind_path(key: str, path: str) -> None:
    _no_control(key, path)
    if "," in path or ":" in path:
        raise ConfigError(key, f"{path!r} contains ',' or ':' (container bind lists cannot express it)")
