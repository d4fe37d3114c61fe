"""The five stages. Each is `run(ctx, round, task)`: it reads its inputs from the run directory, writes its outputs
atomically, and ends with its DONE marker. Launchers call them through `run_task`."""
from __future__ import annotations

import importlib
from typing import Optional

from oel_hpc.stages.common import StageContext


def run_task(ctx: StageContext, stage: str, r: int, task: Optional[int]) -> None:
    module = importlib.import_module(f"oel_hpc.stages.{stage}")
    module.run(ctx, r, task)
