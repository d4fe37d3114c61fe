"""Per-step training metrics to metrics.jsonl and to wandb (offline unless WANDB_API_KEY is set). With several
ranks only rank 0 writes (`enabled=False` elsewhere); the values it logs are already reduced over all ranks."""
from __future__ import annotations

import os
from pathlib import Path

from oel_hpc.log import get_logger
from oel_hpc.rundir import read_jsonl, write_jsonl_atomic

log = get_logger(__name__)


class MetricsLog:
    def __init__(self, path: Path, resume_step: int, wandb_cfg, run_name: str, run_config: dict,
                 enabled: bool = True):
        self.path, self.enabled = path, enabled
        self.rows, self.wandb = [], None
        if not enabled:
            return
        # a resumed job redoes the steps after its checkpoint: drop their rows from the crashed attempt
        self.rows = [row for row in read_jsonl(path) if row["step"] <= resume_step] if path.is_file() else []
        write_jsonl_atomic(path, self.rows)
        self.wandb = self._init_wandb(wandb_cfg, run_name, run_config, path.parent)

    @staticmethod
    def _init_wandb(wandb_cfg, run_name: str, run_config: dict, folder: Path):
        mode = wandb_cfg.mode
        if mode == "disabled":
            return None
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        import wandb

        # a stable id: a requeued job continues the same wandb run instead of starting a new one
        run = wandb.init(project=wandb_cfg.project, name=run_name, id=run_name.replace("/", "-"), resume="allow",
                         mode=mode, dir=str(folder), config=run_config, reinit="finish_previous",
                         settings=wandb.Settings(silent=True))
        upload = " — `wandb sync` it to upload" if mode == "offline" else ""
        log.info(f"wandb ({mode}): {Path(run.dir).parent}{upload}")
        return run

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        write_jsonl_atomic(self.path, self.rows)
        if self.wandb is not None:
            self.wandb.log({f"consolidate/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
