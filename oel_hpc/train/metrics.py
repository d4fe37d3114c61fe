"""Per-step training metrics to metrics.jsonl and to wandb (mode: oel_hpc/tracking.py). With several ranks only
rank 0 writes (`enabled=False` elsewhere); the values it logs are already reduced over all ranks.

metrics.jsonl is the record; wandb is a copy for dashboards and may fail (no network on a compute node, a bad key,
a server that does not answer): then it says so in one warning line and is off for the rest of the stage, which
goes on."""
from __future__ import annotations

import os
from pathlib import Path

from oel_hpc.errors import ConfigError
from oel_hpc.log import get_logger
from oel_hpc.rundir import read_jsonl, write_jsonl_atomic
from oel_hpc.tracking import wandb_mode

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

    def _init_wandb(self, wandb_cfg, run_name: str, run_config: dict, folder: Path):
        try:  # a WANDB_MODE wandb does not know is refused at launch; one set by a job's setup only costs wandb
            mode = wandb_mode(wandb_cfg.mode)
        except ConfigError as e:
            self._give_up("wandb", e)
            return None
        if mode is None:
            return None
        # wandb's own terminal lines ("Loaded credentials ...") would come on top of the one this class writes
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb

            # a stable id: a requeued job continues the same wandb run instead of starting a new one
            run = wandb.init(project=wandb_cfg.project, name=run_name, id=run_name.replace("/", "-"),
                             resume="allow", mode=mode, dir=str(folder), config=run_config,
                             reinit="finish_previous",
                             settings=wandb.Settings(silent=True, init_timeout=float(wandb_cfg.init_timeout_s)))
        except Exception as e:  # noqa: BLE001 - whatever wandb raises, training goes on without it
            self._give_up(f"wandb.init ({mode})", e)
            return None
        upload = " — `wandb sync` it to upload" if mode == "offline" else ""
        log.info(f"wandb ({mode}): {Path(run.dir).parent}{upload}")
        return run

    def _give_up(self, what: str, error: BaseException) -> None:
        log.warning(f"{what} failed, wandb is off for the rest of this stage (metrics still go to "
                    f"{self.path.name}): {one_line(error)}")

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.rows.append(row)
        write_jsonl_atomic(self.path, self.rows)
        if self.wandb is not None:
            try:
                self.wandb.log({f"consolidate/{k}": v for k, v in row.items() if k != "step"}, step=row["step"])
            except Exception as e:  # noqa: BLE001
                self._give_up("wandb.log", e)
                self._finish(quiet=True)

    def close(self) -> None:
        self._finish(quiet=False)

    def _finish(self, quiet: bool) -> None:
        run, self.wandb = self.wandb, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as e:  # noqa: BLE001
            if not quiet:
                self._give_up("wandb.finish", e)


def one_line(error: BaseException, limit: int = 300) -> str:
    """The error's type and first line, without the API key should wandb ever quote it."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"[:limit]
    key = os.environ.get("WANDB_API_KEY", "").strip()
    return text.replace(key, "<WANDB_API_KEY>") if key else text
