"""Per-step training metrics to metrics.jsonl, and each row to the task's progress record (oel_hpc/progress.py),
which also sends it to wandb (oel_hpc/tracking.py). With several ranks only rank 0 writes (`enabled=False`
elsewhere); the values it logs are already reduced over all ranks.

metrics.jsonl is the record; wandb is a copy for dashboards and may fail (no network on a compute node, a bad key,
a server that does not answer): then it says so in one warning line and is off for the rest of the stage, which
goes on."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from oel_hpc.progress import TaskRecord
from oel_hpc.rundir import read_jsonl, write_jsonl_atomic


class MetricsLog:
    def __init__(self, path: Path, resume_step: int, record: Optional[TaskRecord] = None, enabled: bool = True):
        """`record`: the task's progress record, made with keep_upto=resume_step (the same rows kept)."""
        self.path, self.enabled, self.record = path, enabled, record
        self.rows = []
        if not enabled:
            return
        # a resumed job redoes the steps after its checkpoint: drop their rows from the crashed attempt
        self.rows = [row for row in read_jsonl(path) if row["step"] <= resume_step] if path.is_file() else []
        write_jsonl_atomic(path, self.rows)

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        write_jsonl_atomic(self.path, self.rows)
        if self.record is not None:
            self.record.step(row["step"], **{k: v for k, v in row.items() if k != "step"})

    def close(self, failed: bool = False) -> None:
        """Ends the stage's wandb run; again is a no-op."""
        if self.record is not None:
            self.record.close(failed=failed)
