"""This process's place in a job (rank, world, master address), read from what torchrun or srun set. Torch-free:
the lifecycle asks it who writes the markers, and train/distributed.py builds the process group from the same
answer, so the two can never disagree."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from oel_hpc import slurm

DEFAULT_PORT_BASE = 20000  # Slurm: MASTER_PORT = base + SLURM_JOB_ID % 20000 (a requeued job keeps its id and port)


@dataclass(frozen=True)
class DistEnv:
    """What the environment says about this process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    source: Optional[str] = None  # "torchrun" | "slurm" | None (single process)


def slurm_master_addr(nodelist: str) -> str:
    """The first host of a Slurm node list ("node[01-04],gpu7" → "node01")."""
    hosts = slurm.hostnames(nodelist)
    if not hosts:
        raise RuntimeError(f"the Slurm node list {nodelist!r} names no host")
    return hosts[0]


def slurm_master_port(job_id: str | int, base: int = DEFAULT_PORT_BASE) -> int:
    """A port every rank of one job derives alike; jobs sharing a node get different ones (unless their ids are
    20000 apart)."""
    return base + int(str(job_id).split("_")[0]) % 20000


def _in_slurm_step(step_id: Optional[str]) -> bool:
    """srun sets SLURM_STEP_ID for the tasks of a step; the batch script has none. Slurm's special step ids (batch,
    extern, interactive: 0xfffffffa and above) are not steps of ranks either."""
    if not step_id:
        return False
    return step_id.isdigit() and int(step_id) < 0xFFFFFFFA


def detect_env(environ: Mapping[str, str] = os.environ) -> DistEnv:
    env = environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), "torchrun")
    if "SLURM_PROCID" in env and _in_slurm_step(env.get("SLURM_STEP_ID")):
        world = int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS") or "1")
        if world == 1:
            return DistEnv(source="slurm")
        addr = env.get("MASTER_ADDR")
        if not addr:
            nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
            if not nodelist:
                raise RuntimeError("Slurm step with several tasks but no SLURM_JOB_NODELIST: cannot find the master")
            addr = slurm_master_addr(nodelist)
        port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else slurm_master_port(env.get("SLURM_JOB_ID", "0"))
        return DistEnv(int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", "0")), addr, port, "slurm")
    return DistEnv()
