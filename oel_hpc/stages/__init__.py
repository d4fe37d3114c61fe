"""The five stages. Each is `run(ctx, round, task) -> outputs`: it reads its inputs from the run directory, writes
its outputs atomically and returns the files to record in its DONE marker. oel_hpc/lifecycle.py runs them (state
check, stale outputs, `.started`, DONE) for every launcher, through `run_task`."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

from oel_hpc.stages.common import StageContext


def run_task(ctx: StageContext, stage: str, r: int, task: Optional[int]) -> list[Path]:
    module = importlib.import_module(f"oel_hpc.stages.{stage}")
    return module.run(ctx, r, task)
