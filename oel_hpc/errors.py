"""Every error oel_hpc raises on purpose, and the exit status it ends a command with.

One rule for every entry point (`python -m oel_hpc`, the worker a Slurm job runs, `python -m oel_hpc.status`):
0 done; 2 bad input, reported as one line naming the key or file at fault; 75 stopped early with a checkpoint
(run the same command again, or let the requeued Slurm job, resume it); anything else a failure. An `OelError`
is reported as one line; any other exception keeps its traceback, because it is a bug or a crash, not a verdict.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped early with a checkpoint; run the same task again to resume


class OelError(Exception):
    """An outcome oel_hpc reports in one line; `exit_code` is the command's exit status."""

    exit_code = EXIT_FAILURE


class ConfigError(OelError, ValueError):
    """Bad input: `key` names the config key or file at fault."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class StageConflict(ConfigError):
    """A stage finished under another config (or its old jobs are still queued): redoing it needs consent."""

    def __init__(self, message: str, key: str = "run.name"):
        OelError.__init__(self, message)  # the message names the stage and how to go on; no key prefix
        self.key = key


class EmptyExperience(ConfigError):
    """Every experience is empty: distilling it would train on a loss that is identically zero."""

    def __init__(self, message: str, key: str = "consolidate.allow_empty_experience"):
        OelError.__init__(self, message)
        self.key = key


class PromptTooLong(ConfigError):
    """A prompt does not fit its token budget even after dropping every older turn block."""

    def __init__(self, message: str, key: str = "prompts"):
        OelError.__init__(self, message)
        self.key = key


class MissingInput(ConfigError, FileNotFoundError):
    """A file a stage reads does not exist (an upstream stage did not write it, or a configured path is wrong)."""

    def __init__(self, path, message: str):
        OelError.__init__(self, message)
        self.key = str(path)


class RunInUse(ConfigError):
    """Another command writes this run: it holds the run directory's lock (oel_hpc/runlock.py)."""

    def __init__(self, message: str, key: str = "run.name"):
        OelError.__init__(self, message)  # the message names the run directory and its holder
        self.key = key


class DamagedInput(ConfigError):
    """A file a finished task wrote does not match its DONE marker, or cannot be read (cut short, not JSON): it is
    never used. A launcher redoes the task that wrote it; a task that reads it stops."""

    def __init__(self, path, message: str):
        OelError.__init__(self, message)
        self.key = str(path)


class SlurmError(OelError):
    """A Slurm command failed or refused a job (its message names the command and Slurm's answer). Exit 2: what
    Slurm refuses is the submission's input (partition, account, limits), and nothing was left running."""

    exit_code = EXIT_BAD_INPUT


class Preempted(OelError):
    """Training stopped early at a step boundary; its state is in `checkpoint`."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, signal_name: str, checkpoint, requeued: bool):
        self.step, self.signal_name, self.checkpoint, self.requeued = step, signal_name, checkpoint, requeued
        how = "the Slurm job is requeued and will resume there" if requeued else "run it again to resume there"
        super().__init__(f"stopped by {signal_name} after step {step}; checkpoint {checkpoint}; {how}")


class DamagedCheckpoint(OelError):
    """A checkpoint failed to load after it may have written into the model, and no older one loaded."""


class AllStepsSkipped(OelError):
    """Every update of a consolidation was skipped (non-finite losses or gradient norms): its weights are the round's
    start."""


class SkippedInARow(OelError):
    """consolidate.max_skipped_in_a_row updates in a row were skipped (a non-finite loss or gradient norm): training
    has stopped learning, and the stage stops rather than export weights that merely survived."""


class NonFiniteWeights(OelError):
    """A weight became NaN or infinite (after an update, or in the dtype it is exported in): nothing is saved."""


@contextmanager
def exit_on_error(prog: str) -> Iterator[None]:
    """Around an entry point's body: an `OelError` ends the process with its exit status and one line on stderr
    (`<prog>: error: ...`; a preemption is no error and says only what happened); anything else keeps its traceback."""
    try:
        yield
    except OelError as e:
        print(f"{prog}: {'' if isinstance(e, Preempted) else 'error: '}{e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
