"""Logging for every process of a run: who is speaking (stage, task, rank) on each line, and progress that suits
where it is written.

A Slurm job's log is a file: a tqdm bar there is thousands of carriage-return redraws in one line. So `progress`
draws a bar only on a terminal; elsewhere it logs one line at most every `OEL_PROGRESS_EVERY_S` seconds (default
60) plus the last, with rate and time left. Messages go to stderr, results (the summary, the status table) stay
on stdout, so `python -m oel_hpc > summary.txt` holds only the summary.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")
_ROOT = "oel_hpc"


class _Prefix(logging.Filter):
    """Adds `record.who`: the stage/task and rank this process works for, set once by `set_context`."""

    who, stage, rank, world = "", "", 0, 1

    def filter(self, record: logging.LogRecord) -> bool:
        record.who = self.who
        return True


_prefix = _Prefix()


def get_logger(name: str) -> logging.Logger:
    """The logger of a module (`get_logger(__name__)`); its lines carry the process's context."""
    _install()
    return logging.getLogger(name if name.startswith(_ROOT) else f"{_ROOT}.{name}")


def set_context(stage: Optional[str] = None, rank: Optional[int] = None, world: Optional[int] = None) -> None:
    """Name the task (e.g. "r1/extract seed 3") and the rank on every line; what is not given stays as it was. The
    rank shows only when there are several."""
    if stage is not None:
        _prefix.stage = stage
    if rank is not None:
        _prefix.rank, _prefix.world = rank, world or 1
    rank_part = f"rank {_prefix.rank}/{_prefix.world}" if _prefix.world > 1 else None
    parts = [p for p in (_prefix.stage, rank_part) if p]
    _prefix.who = f"[{' '.join(parts)}] " if parts else ""


def _install() -> None:
    logger = logging.getLogger(_ROOT)
    if getattr(logger, "_oel_installed", False):
        return
    handler = _Stderr()
    handler.setFormatter(_Formatter())
    handler.addFilter(_prefix)
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("OEL_LOG_LEVEL", "INFO").upper())
    logger.propagate = False
    logger._oel_installed = True
    if not sys.stderr.isatty():
        _quiet_library_bars()


def _quiet_library_bars() -> None:
    """transformers and huggingface_hub draw their own bars (loading weights, writing shards); in a batch log they
    are redraw noise. Their switch is read when they are imported, so set it early and flip it if already loaded."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


class _Stderr(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a line is written, not when the handler was made (pytest swaps it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno == logging.INFO else f"{record.levelname}: "
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{stamp} {getattr(record, 'who', '')}{level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def progress(iterable: Iterable[T], *, total: Optional[int] = None, desc: str = "", unit: str = "it",
             initial: int = 0, disable: bool = False, logger: Optional[logging.Logger] = None) -> Iterator[T]:
    """`tqdm(iterable)` on a terminal; in a batch log, a line per `OEL_PROGRESS_EVERY_S` seconds and one at the end."""
    if total is None and hasattr(iterable, "__len__"):
        total = initial + len(iterable)  # type: ignore[arg-type]
    if disable:
        yield from iterable
        return
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        yield from tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, leave=False)
        return
    log = logger or get_logger("progress")
    every = float(os.environ.get("OEL_PROGRESS_EVERY_S", "60"))
    start = last = time.monotonic()
    done = initial
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every or done == total:
            last = now
            log.info(_line(desc, done, total, unit, initial, now - start))


def _line(desc: str, done: int, total: Optional[int], unit: str, initial: int, elapsed: float) -> str:
    rate = (done - initial) / elapsed if elapsed > 0 else 0.0
    of = f"/{total}" if total else ""
    text = f"{desc}: {done}{of} {unit}s, {_clock(elapsed)}"
    if total and rate > 0 and done < total:
        text += f", {_clock((total - done) / rate)} left"
    return text


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"
