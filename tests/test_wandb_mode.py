"""wandb follows the user: which mode it runs in (config, then WANDB_MODE, then offline; an API key is no reason to
go online), and a wandb that fails costs a warning line, never the training stage, and never shows the key.

The real wandb package runs here, without network: "online" points it at a closed local port."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, compose
from oel_hpc.errors import ConfigError
from oel_hpc.tracking import wandb_mode
from oel_hpc.progress import TaskRecord
from oel_hpc.tracking import WandbRun
from oel_hpc.train.metrics import MetricsLog

KEY = "0123456789abcdef0123456789abcdef5ec7e7a1"  # 40 characters, as a real key; no server ever sees it
NO_SERVER = "http://127.0.0.1:9"  # the discard port: nothing listens, so every request is refused


@pytest.mark.parametrize("configured, env_mode, key, expected", [
    # auto: WANDB_MODE when set, else offline; a key set changes nothing
    ("auto", None, None, "offline"),
    ("auto", None, KEY, "offline"),
    ("auto", "offline", KEY, "offline"),
    ("auto", "dryrun", KEY, "offline"),
    ("auto", "online", None, "online"),
    ("auto", "run", KEY, "online"),
    ("auto", "ONLINE", KEY, "online"),
    ("auto", "disabled", KEY, None),
    ("auto", "", KEY, "offline"),  # set but empty: not a request
    # a mode in the config wins over the environment
    ("offline", "online", KEY, "offline"),
    ("online", "offline", None, "online"),
    ("online", None, KEY, "online"),
    ("disabled", "online", KEY, None),
    ("offline", "disabled", None, "offline"),
])
def test_mode_resolution(configured, env_mode, key, expected):
    env = {k: v for k, v in {"WANDB_MODE": env_mode, "WANDB_API_KEY": key}.items() if v is not None}
    assert wandb_mode(configured, env) == expected


def test_a_mode_wandb_would_refuse_is_a_config_error_before_anything_runs(monkeypatch):
    from oel_hpc.config import validate

    cfg = compose(["wandb.mode=offline"])
    monkeypatch.setenv("WANDB_MODE", "onlin")
    with pytest.raises(ConfigError, match="WANDB_MODE.*'onlin' is not a wandb mode"):
        validate(cfg, check_files=False)
    cfg.wandb.mode = "disabled"
    validate(cfg, check_files=False)  # wandb is never started: nothing to refuse
    monkeypatch.setenv("WANDB_MODE", "offline")
    for bad in (0.0, -1.0, float("nan"), float("inf"), 1e6):
        cfg.wandb.init_timeout_s = bad
        with pytest.raises(ConfigError, match="wandb.init_timeout_s"):
            validate(cfg, check_files=False)


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """A key in the environment, wandb's own folders under tmp_path (so every file it writes is searched)."""
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "home" / var.lower()))
    return tmp_path


def assert_key_nowhere(folder, *texts):
    for text in texts:
        assert KEY not in text and KEY[:20] not in text
    for path in folder.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert KEY.encode() not in data and KEY[:20].encode() not in data, path


ROWS = [{"step": 1, "kl": 0.5}, {"step": 2, "kl": 0.25}]


def metrics_log(out, wandb_cfg, name):
    """The consolidation's metrics log as the stage makes it: metrics.jsonl, and each row through the task's progress
    record to its wandb run (StageContext.record)."""
    run = WandbRun(wandb_cfg, group="g", job_type="consolidate", name=name, run_id=name, folder=out.parent,
                   config={"a": 1}, record_name="progress.jsonl")
    return MetricsLog(out, 0, TaskRecord(out.parent / "progress.jsonl", 2, "step", run))


FAILING_STAGE = """
import sys
from pathlib import Path
from omegaconf import OmegaConf
from oel_hpc.config import WandbConfig
from oel_hpc.progress import TaskRecord
from oel_hpc.tracking import WandbRun
from oel_hpc.train.metrics import MetricsLog
cfg = OmegaConf.structured(WandbConfig(mode="online", init_timeout_s=3))
out = Path(sys.argv[1])
run = WandbRun(cfg, group="g", job_type="consolidate", name="r1/consolidate", run_id="failing-r1", folder=out.parent,
               config={"a": 1}, record_name="progress.jsonl")
metrics = MetricsLog(out, 0, TaskRecord(out.parent / "progress.jsonl", 2, "step", run))
for step in (1, 2):
    metrics.log({"step": step, "kl": 1 / step})
metrics.close()
"""


def test_failing_wandb_costs_one_warning_line_not_the_metrics(wandb_env):
    """In a process of its own, as a stage runs: what reaches stderr is exactly one line."""
    out = wandb_env / "run" / "metrics.jsonl"
    env = {**os.environ, "WANDB_BASE_URL": NO_SERVER, "OMP_NUM_THREADS": "1"}
    env.pop("WANDB_SILENT", None)  # as a user's shell has it: wandb's own lines would show
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", FAILING_STAGE, str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == [{"step": 1, "kl": 1.0},
                                                                        {"step": 2, "kl": 0.5}]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "wandb.init (online) failed, wandb is off" in lines[0], done.stderr
    assert time.monotonic() - t0 < 60  # wandb.init_timeout_s=3 bounds the wait (wandb's own default is 90 s)
    assert_key_nowhere(wandb_env, done.stdout, done.stderr)


def test_offline_writes_its_run_folder_and_no_key(wandb_env, capfd):
    out = wandb_env / "run" / "metrics.jsonl"
    metrics = metrics_log(out, compose([]).wandb, "offline-r1")  # auto, WANDB_MODE unset: offline
    for row in ROWS:
        metrics.log(row)
    metrics.close()
    runs = list((out.parent / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb")), list((out.parent / "wandb").iterdir())
    captured = capfd.readouterr()
    assert "wandb (offline)" in captured.err and "wandb sync" in captured.err
    assert "wandb is off" not in captured.err
    assert_key_nowhere(wandb_env, captured.out, captured.err)


def test_a_failing_log_turns_wandb_off_and_hides_the_key(wandb_env, capfd):
    out = wandb_env / "run" / "metrics.jsonl"
    metrics = metrics_log(out, compose(["wandb.mode=offline"]).wandb, "broken-r1")
    assert metrics.record.wandb.run is not None

    def broken(*args, **kwargs):
        raise RuntimeError(f"upload refused for key {KEY}\nsecond line of detail")

    metrics.record.wandb.run.log = broken
    for row in ROWS:
        metrics.log(row)
    metrics.close()
    assert metrics.record.wandb is None and [json.loads(line) for line in out.read_text().splitlines()] == ROWS
    captured = capfd.readouterr()
    warnings = [line for line in captured.err.splitlines() if "wandb is off" in line]
    assert len(warnings) == 1 and "wandb.log failed" in warnings[0], captured.err
    assert "<WANDB_API_KEY>" in warnings[0] and "second line" not in captured.err
    assert KEY not in captured.err


def test_a_bad_wandb_mode_in_a_jobs_environment_costs_wandb_only(wandb_env, monkeypatch, capfd):
    monkeypatch.setenv("WANDB_MODE", "onlin")  # validated at launch; a job's cluster.setup could still set it
    out = wandb_env / "run" / "metrics.jsonl"
    metrics = metrics_log(out, compose([]).wandb, "bad-env-r1")
    metrics.log(ROWS[0])
    metrics.close()
    assert out.read_text().splitlines() == [json.dumps(ROWS[0])]
    warnings = [line for line in capfd.readouterr().err.splitlines() if "wandb is off" in line]
    assert len(warnings) == 1 and "'onlin' is not a wandb mode" in warnings[0]
