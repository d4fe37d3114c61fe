"""Preemption and time limits: stop at a step boundary with a checkpoint, and (under Slurm) requeue.

SIGUSR2 (Slurm's warning before the time limit, `--signal=USR2@<seconds>`) and SIGTERM (preemption, scancel, the
time limit itself) only set a flag. At the end of each step every rank all-reduces its flag, so all of them stop
after the same step even when only some got the signal; they save a checkpoint there and raise `Preempted`, which
`python -m oel_hpc.worker` turns into exit status `EXIT_PREEMPTED` (75). On SIGUSR2 inside a Slurm job, rank 0
first runs `scontrol requeue $SLURM_JOB_ID` (all ranks wait for it): the job goes back to the queue, keeps its id,
and its next start finds this checkpoint on disk and resumes. SIGTERM never requeues (it is also what `scancel`
sends); a job Slurm preempts with PreemptMode=REQUEUE is requeued by Slurm itself.
"""
from __future__ import annotations

import signal
from typing import Optional

from oel_hpc.errors import EXIT_PREEMPTED, Preempted, SlurmError  # noqa: F401  (EXIT_PREEMPTED: what it ends with)
from oel_hpc.log import get_logger
from oel_hpc.slurm import Slurm, current_job

log = get_logger(__name__)

REQUEUE_SIGNALS = ("SIGUSR2",)


class StopSignals:
    """Context manager: while inside, SIGUSR2 and SIGTERM set `self.received` (the first signal's name) instead of
    killing the process. Previous handlers come back on exit. Only the main thread can install handlers; elsewhere
    this does nothing."""

    SIGNALS = ("SIGUSR2", "SIGTERM")

    def __init__(self):
        self.received: Optional[str] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            log.warning(f"received {name}: stopping with a checkpoint at the end of this step")

    def __enter__(self) -> "StopSignals":
        try:
            for name in self.SIGNALS:
                signum = getattr(signal, name)
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread
            self.__exit__()
        return self

    def __exit__(self, *exc) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def agreed(self, d=None) -> Optional[str]:
        """The signal to stop for if *any* rank got one (a collective: every rank calls it at the same step), else
        None. SIGUSR2 wins over SIGTERM, so a requeue is not lost because another rank saw SIGTERM first."""
        mine = {None: 0, "SIGTERM": 1, "SIGUSR2": 2}.get(self.received, 1)
        if d is not None:
            mine = int(d.all_reduce([mine], op="max")[0])
        return {0: None, 1: "SIGTERM", 2: "SIGUSR2"}[mine]


def requeue_slurm_job(job_id: Optional[str] = None) -> bool:
    """`scontrol requeue` this job (or `job_id`). True when Slurm accepted it; a failure is logged and returns False
    (the caller still exits with its checkpoint saved). Slurm then ends the running job and queues it again under
    the same id (SLURM_RESTART_COUNT counts the restarts)."""
    job_id = job_id or current_job()
    if not job_id:
        return False
    try:
        Slurm().requeue(job_id)
    except SlurmError as e:
        log.error(str(e))
        return False
    log.info(f"requeued Slurm job {job_id}")
    return True


def stop(signal_name: str, step: int, checkpoint, d=None, requeue: bool = True) -> Preempted:
    """After the checkpoint of `step` is saved (by every rank): rank 0 requeues the Slurm job when the signal asks
    for it, every rank waits for that, and the exception to raise comes back (the same on every rank)."""
    requeued = False
    if requeue and signal_name in REQUEUE_SIGNALS and current_job():
        if d is None or d.is_main:
            # said first: Slurm kills the job as soon as it accepts the requeue, before the exception is reported
            log.info(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}; requeueing the Slurm job")
            requeued = requeue_slurm_job()
        if d is not None:
            requeued = bool(d.broadcast(requeued))
    elif d is not None:
        d.barrier()
    return Preempted(step, signal_name, checkpoint, requeued)
