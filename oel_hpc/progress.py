"""Every task's progress record: `progress.jsonl` beside its DONE marker (RunPaths.progress), one JSON row per unit
of work done — `{"done": k, "total": K, "unit": "step"|"game"|"checkpoint", "t": <unix time>, **measures}` — the
whole file rewritten through temp + rename after each unit, so a reader (the dashboard) never sees half a line.
Each row also goes to the task's wandb run (tracking.WandbRun), when there is one.

A task starting from scratch starts a fresh file; a resumed one (a consolidation from its checkpoint) keeps the rows
up to where it resumes. The record is not an output: DONE never lists it, nothing decides "done" from it.
Torch-free: the dashboard and the lifecycle import it."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from oel_hpc.errors import DamagedInput
from oel_hpc.log import get_logger
from oel_hpc.rundir import read_jsonl, write_text_atomic

log = get_logger(__name__)

UNITS = ("step", "game", "checkpoint")


class TaskRecord:
    def __init__(self, path: Path, total: int, unit: str, wandb_run=None, keep_upto: Optional[int] = None,
                 enabled: bool = True):
        if unit not in UNITS:
            raise ValueError(f"progress unit '{unit}' is not one of {UNITS}")
        self.path, self.total, self.unit, self.wandb, self.enabled = path, int(total), unit, wandb_run, enabled
        self.rows: list[dict] = []
        self._lines: list[str] = []  # the rows as written: each serialised once, however long the task
        if not enabled:
            return
        if keep_upto is not None and path.is_file():
            self.rows = [row for row in _readable_rows(path) if row.get("done", 0) <= keep_upto]
        self._lines = [json.dumps(row) + "\n" for row in self.rows]
        self._write()  # a fresh start empties what an earlier attempt wrote

    def step(self, done: int, **measures) -> None:
        """Unit `done` (1-based) of `total` is finished, with what it measured."""
        if not self.enabled:
            return
        row = {"done": int(done), "total": self.total, "unit": self.unit, "t": time.time(), **measures}
        self.rows.append(row)
        self._lines.append(json.dumps(row) + "\n")
        self._write()
        if self.wandb is not None:
            self.wandb.log(done, measures)

    def _write(self) -> None:
        # temp + rename (never a torn line), without fsync (the cost of a rewrite; docs/wandb.md): the file is no
        # output, and what a crash of the machine could lose of it the stage's own files hold
        write_text_atomic(self.path, "".join(self._lines), durable=False)

    def close(self, failed: bool = False) -> None:
        """Ends the task's wandb run (one per process at a time: the next task's starts clean)."""
        run, self.wandb = self.wandb, None
        if run is not None:
            run.finish(failed=failed)

    def __enter__(self) -> "TaskRecord":
        return self

    def __exit__(self, kind, error, tb) -> None:
        self.close(failed=kind is not None)


def _readable_rows(path: Path) -> list[dict]:
    """The rows of an earlier attempt's record; one that cannot be read is started afresh: it is no output, and the
    rows it held are in the stage's own files (metrics.jsonl)."""
    try:
        return read_jsonl(path)
    except DamagedInput as e:
        log.warning(f"{e}; the progress record starts afresh")
        return []
