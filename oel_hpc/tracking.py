"""Which mode wandb runs in: what the user asked for, never what a credential suggests.

Compute nodes rarely reach the internet, so online is something to ask for: `wandb.mode=online|offline|disabled`
in the config wins; under `wandb.mode=auto` (the default) an explicit `WANDB_MODE` in the environment wins; else
offline (`wandb sync` uploads it later: docs/wandb.md). A `WANDB_API_KEY` in the environment is not a request to go
online: it is set on login nodes and inherited by every job.

Every task of a run is one wandb run (WandbRun), grouped by run.name; progress.py sends it each unit of work.
"""
from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path
from typing import Mapping, Optional

from oel_hpc.errors import ConfigError
from oel_hpc.log import get_logger

log = get_logger(__name__)

# WANDB_MODE values wandb itself accepts, and what each means here (dryrun and run are its old names)
WANDB_ENV_MODES = {"online": "online", "run": "online", "shared": "shared", "offline": "offline",
                   "dryrun": "offline", "disabled": "disabled"}


def wandb_mode(configured: str, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The mode to pass to wandb.init for `wandb.mode=configured`; None when wandb is off. A WANDB_MODE that wandb
    would refuse is a ConfigError (wandb reads it even when the config names the mode)."""
    environ = os.environ if environ is None else environ
    env = environ.get("WANDB_MODE", "").strip()
    if str(configured) == "disabled":
        return None
    if env and env.lower() not in WANDB_ENV_MODES:
        raise ConfigError("WANDB_MODE", f"'{env}' is not a wandb mode (environment variable; one of: "
                          f"{', '.join(WANDB_ENV_MODES)})")
    if str(configured) != "auto":
        mode = str(configured)
    else:
        mode = WANDB_ENV_MODES[env.lower()] if env else "offline"
    return None if mode == "disabled" else mode


# ---------------------------------------------------------------------------------------------------------------
# One wandb run per task, grouped per run (see docs/wandb.md)

_ID_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")
ID_LENGTH = 64  # wandb keeps run ids short; a longer one is cut, its hash suffix kept


def task_label(r: int, stage: str, task: Optional[int]) -> str:
    """The wandb run's name: `r1/extract/seed_3`, `r1/consolidate`, `r2/eval/step_4`."""
    if stage == "extract":
        return f"r{r}/extract/seed_{task}"
    if stage == "evaluate":
        return f"r{r}/eval/step_{task}"
    return f"r{r}/{stage}"


def wandb_run_id(root: Path, run_name: str, r: int, stage: str, task: Optional[int], stage_hash: str) -> str:
    """The same for every attempt of one task under one config, so a requeued job resumes its wandb run; another
    for another run directory (two runs of one name elsewhere) or another config (a redone stage is a new run,
    whose steps start again from 1). Readable, and only of characters wandb accepts."""
    digest = hashlib.sha256(f"{Path(root).resolve()}\0{stage_hash}".encode()).hexdigest()[:10]
    readable = _ID_CHARS.sub("-", f"{run_name}-{task_label(r, stage, task)}").strip("-.")
    return f"{readable[:ID_LENGTH - len(digest) - 1]}-{digest}"


def numbers(measures: Mapping[str, object]) -> dict:
    """What wandb can plot of a row: numbers and booleans (a skip reason, a None are for the file only)."""
    return {k: v for k, v in measures.items() if isinstance(v, (int, float))}  # bool is an int


class WandbRun:
    """One task's wandb run: `group` = run.name, `job_type` = stage, a stable id resumed by a requeued job, its
    offline folder inside the task's folder. Whatever wandb raises costs one warning line and wandb for the rest of
    the task, never the task; the files (progress.jsonl, metrics.jsonl) are the record."""

    def __init__(self, wandb_cfg, *, group: str, job_type: str, name: str, run_id: str, folder: Path,
                 config: dict, record_name: str):
        self.job_type, self.record_name, self.run, self.step = job_type, record_name, None, 0
        try:  # a WANDB_MODE wandb does not know is refused at launch; one set by a job's setup only costs wandb
            mode = wandb_mode(wandb_cfg.mode)
        except ConfigError as e:
            self._give_up("wandb", e)
            return
        if mode is None:
            return
        # wandb's own terminal lines ("Loaded credentials ...") would come on top of the one this class writes
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb

            folder.mkdir(parents=True, exist_ok=True)
            self.run = wandb.init(project=wandb_cfg.project, group=group, job_type=job_type, name=name, id=run_id,
                                  resume="allow", mode=mode, dir=str(folder), config=config,
                                  reinit="finish_previous",  # one wandb run per process: a stage before is over
                                  settings=wandb.Settings(silent=True,
                                                          init_timeout=float(wandb_cfg.init_timeout_s)))
            # x axis: the task's own unit count, not wandb's step (a time: see log)
            self.run.define_metric(f"{job_type}/done")
            self.run.define_metric(f"{job_type}/*", step_metric=f"{job_type}/done")
        except Exception as e:  # noqa: BLE001 - whatever wandb raises, the stage goes on without it
            self._give_up(f"wandb.init ({mode})", e)
            self._finish(quiet=True)
            return
        upload = " — `wandb sync` it to upload (docs/wandb.md)" if mode == "offline" else ""
        log.info(f"wandb ({mode}): {Path(self.run.dir).parent}{upload}")

    def _give_up(self, what: str, error: BaseException) -> None:
        log.warning(f"{what} failed, wandb is off for the rest of this task (the record goes on in "
                    f"{self.record_name}): {one_line(error)}")

    def log(self, done: int, measures: Mapping[str, object]) -> None:
        if self.run is None:
            return
        # wandb's step: the time in milliseconds, so that the attempts of a requeued task, uploaded one after the
        # other into one wandb run, never go back on it (wandb drops rows whose step it has passed)
        self.step = max(self.step + 1, time.time_ns() // 1_000_000)
        try:
            self.run.log({f"{self.job_type}/{k}": v for k, v in {**numbers(measures), "done": done}.items()},
                         step=self.step)
        except Exception as e:  # noqa: BLE001
            self._give_up("wandb.log", e)
            self._finish(quiet=True)

    def finish(self, failed: bool = False) -> None:
        self._finish(quiet=False, exit_code=1 if failed else 0)

    def _finish(self, quiet: bool, exit_code: int = 0) -> None:
        run, self.run = self.run, None
        if run is None:
            return
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            if not quiet:
                self._give_up("wandb.finish", e)


def one_line(error: BaseException, limit: int = 300) -> str:
    """The error's type and first line, without the API key should wandb ever quote it."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"[:limit]
    key = os.environ.get("WANDB_API_KEY", "").strip()
    return text.replace(key, "<WANDB_API_KEY>") if key else text
