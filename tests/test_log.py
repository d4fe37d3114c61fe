"""Log lines name who speaks (stage, rank), and progress in a batch log is a few lines, not a redrawn bar."""
from __future__ import annotations

import subprocess
import sys

from oel_hpc import log


def test_lines_carry_the_stage_and_rank_and_levels_show(capsys):
    try:
        log.set_context(stage="r1/extract (seed 3)")
        log.get_logger("oel_hpc.test").info("first")
        log.set_context(rank=1, world=2)
        log.get_logger("oel_hpc.test").warning("second")
    finally:
        log.set_context(stage="", rank=0, world=1)
    err = capsys.readouterr().err.splitlines()
    assert err[0].endswith("[r1/extract (seed 3)] first")
    assert err[1].endswith("[r1/extract (seed 3) rank 1/2] WARNING: second")


def test_one_rank_is_not_named(capsys):
    log.set_context(stage="r1/gather", rank=0, world=1)
    try:
        log.get_logger("oel_hpc.test").info("x")
    finally:
        log.set_context(stage="")
    assert capsys.readouterr().err.strip().endswith("[r1/gather] x")


def test_progress_in_a_batch_log_writes_a_line_per_period_and_the_last(capsys, monkeypatch):
    monkeypatch.setenv("OEL_PROGRESS_EVERY_S", "3600")  # nothing periodic within this test: only the last line
    assert list(log.progress(range(50), desc="r1 deploy", unit="step")) == list(range(50))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "r1 deploy: 50/50 steps" in lines[0]
    monkeypatch.setenv("OEL_PROGRESS_EVERY_S", "0")  # every item is past the period
    list(log.progress(range(3), desc="d", unit="game", initial=2, total=5))
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ")[-1].split(" ", 1)[-1].split(",")[0] for line in lines] == \
        ["d: 3/5 games", "d: 4/5 games", "d: 5/5 games"]
    assert "left" in lines[0] and "left" not in lines[-1]


def test_a_batch_job_log_gets_no_carriage_returns(tmp_path):
    """What a Slurm job's log file receives: stderr is a file, not a terminal."""
    code = ("import os; os.environ['OEL_PROGRESS_EVERY_S'] = '0'\n"
            "from oel_hpc import log\n"
            "for _ in log.progress(range(20), desc='consolidate', unit='step'): pass\n")
    with open(tmp_path / "job.log", "w") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True, timeout=60)
    text = (tmp_path / "job.log").read_text()
    assert "\r" not in text and text.count("\n") == 20


def test_disabled_progress_says_nothing(capsys):
    assert list(log.progress([1, 2], disable=True)) == [1, 2]
    assert capsys.readouterr().err == ""
