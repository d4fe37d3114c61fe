"""Hydra sweeps (oel_hpc/launch/sweep.py, `python -m oel_hpc -m key=a,b`): the points Hydra's basic sweeper would
make, their run names, the sweep record, the checks before anything is written. Torch-free and fast; the real
local sweep is tests/test_sweep_local.py, the Slurm one tests/test_sweep_slurm.py."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from oel_hpc.config import RUN_NAME_MAX
from oel_hpc.errors import ConfigError, StageConflict
from oel_hpc.launch import guard
from oel_hpc.launch.sweep import (POINT_MAX, RECORD, REDACTED, expand, merge_record, point_names, record_entry,
                                  redact)
from tests.conftest import ROOT

# what config.py's run.name check accepts for a sweep point, written out here
POINT_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def hydra_points(overrides):
    """The jobs Hydra's own basic sweeper makes of these overrides (its code, not ours)."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    return BasicSweeper.split_arguments(parsed, None)[0]


@pytest.mark.parametrize("overrides", [
    ["consolidate.lr=1e-6,3e-6", "experiment=tiny"],
    ["experiment=tiny", "consolidate.lr=1e-6,3e-6", "extract.seeds=1,2,3"],
    ["extract.seeds=range(1,4)", "consolidate.lr=choice(0.1,0.2)"],
    ["prompts.system='a,b',c", "consolidate.steps=2"],
    ["consolidate.lr=1e-6,3e-6", "consolidate.lr=5e-6,7e-6"],  # a key given twice: its last value, first place
])
def test_points_are_hydras_cartesian_product(overrides):
    sweep = expand(overrides)
    expected = hydra_points(overrides)
    assert len(sweep.points) == len(expected)
    for point, job in zip(sweep.points, expected):
        swept = {k: job_value for k, job_value in (j.split("=", 1) for j in job) if k in sweep.params}
        assert point.params == swept
        assert [o for o in point.overrides if o.split("=", 1)[0] in sweep.params] == \
            [j for j in job if j.split("=", 1)[0] in sweep.params]


def test_no_swept_value_is_no_sweep():
    assert expand(["consolidate.lr=1e-6", "experiment=tiny", "+x=[1,2]"]) is None


def test_unswept_overrides_keep_their_text():
    sweep = expand(["~wandb.entity", "consolidate.lr=1,2", 'prompts.system="a b"'])
    assert sweep.points[0].overrides == ["~wandb.entity", "consolidate.lr=1", 'prompts.system="a b"']


def test_glob_over_a_config_group_sees_its_options():
    sweep = expand(["experiment=glob(frozenlake_qwen3_*)"])
    available = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("frozenlake_qwen3_*.yaml"))
    assert len(available) >= 2
    assert sorted(p.params["experiment"] for p in sweep.points) == available


@pytest.mark.parametrize("overrides, key", [
    (["consolidate.lr=1e-6,1e-6"], "consolidate.lr"),
    (["run.name=a,b"], "run.name"),
    (["consolidate.lr=interval(0,1)"], "consolidate.lr"),
])
def test_sweeps_refused(overrides, key):
    with pytest.raises(ConfigError) as e:
        expand(overrides)
    assert e.value.key == key


def test_names_are_readable_and_stable():
    sweep = expand(["experiment=tiny,smollm2_frozenlake", "consolidate.lr=1e-6,3e-6"])
    assert [p.name for p in sweep.points] == ["experiment-tiny_lr-1e-06", "experiment-tiny_lr-3e-06",
                                              "experiment-smollm2_frozenlake_lr-1e-06",
                                              "experiment-smollm2_frozenlake_lr-3e-06"]
    again = expand(["experiment=tiny,smollm2_frozenlake", "consolidate.lr=1e-6,3e-6"])
    assert [p.name for p in again.points] == [p.name for p in sweep.points]


def test_keys_with_the_same_last_part_are_named_in_full():
    names = point_names([{"extract.sampling.temperature": "0.7", "deploy.sampling.temperature": "1.0"}])
    assert names == ["extract.sampling.temperature-0.7_deploy.sampling.temperature-1.0"]


def test_values_that_do_not_fit_a_folder_name_are_shortened_with_a_hash():
    long = "x" * 200
    points = [{"model.path": "/models/a b/qwen"}, {"model.path": "/models/a-b/qwen"}, {"model.path": long},
              {"model.path": long + "y"}, {"model.path": "../up"}, {"model.path": ""}]
    names = point_names(points)
    assert len(set(names)) == len(names)
    for name in names:
        assert len(name) <= POINT_MAX
        assert POINT_RUN_NAME.match(f"sweep/{name}"), name
    assert names[0].startswith("path-models-a-b-qwen-") and names[1].startswith("path-models-a-b-qwen-")
    assert names == point_names(points)


def test_many_keys_stay_within_the_point_length():
    params = {f"section{i}.key{i}": "v" * 20 for i in range(8)}
    other = dict(params, **{"section7.key7": "w" * 20})
    a, b = point_names([params, other])
    assert a != b and len(a) <= POINT_MAX and len(b) <= POINT_MAX
    assert len("s" * (RUN_NAME_MAX - POINT_MAX - 1) + "/" + a) <= RUN_NAME_MAX


def test_points_that_would_read_alike_get_distinct_names():
    names = point_names([{"a": "x_b-y", "b": "z"}, {"a": "x", "b": "y_b-z"}])
    assert len(set(names)) == 2


def test_secrets_never_reach_the_record(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "wandb-secret-sweep-0a1f")
    args = ["wandb.api_key=abc", "+hf_token=hf_XYZ", "wandb.project=p", "experience.max_tokens=64",
            "prompts.tokens_per_turn=32", "x.secret=s", "note=wandb-secret-sweep-0a1f"]
    assert redact(args) == [f"wandb.api_key={REDACTED}", f"+hf_token={REDACTED}", "wandb.project=p",
                            "experience.max_tokens=64", "prompts.tokens_per_turn=32", f"x.secret={REDACTED}",
                            f"note={REDACTED}"]


# ---------------------------------------------------------------------------------------------------------------
# The record

def _entries(values):
    sweep = expand([f"consolidate.lr={','.join(values)}"])
    return sweep.params, [record_entry(p, f"s/{p.name}", [*p.overrides, f"run.name=s/{p.name}"])
                          for p in sweep.points]


def test_record_rerun_and_added_points(tmp_path):
    folder = tmp_path / "s"
    params, entries = _entries(["1", "2"])
    record, changed = merge_record(folder, "s", ["cmd"], params, entries)
    assert changed and [p["run"] for p in record["points"]] == ["s/lr-1", "s/lr-2"]
    assert record["points"][0] == {"run": "s/lr-1", "run_dir": "lr-1", "params": {"consolidate.lr": "1"},
                                   "overrides": ["consolidate.lr=1", "run.name=s/lr-1"]}
    folder.mkdir()
    (folder / RECORD).write_text(json.dumps(record))
    assert merge_record(folder, "s", ["cmd"], params, entries) == (record, False)
    params3, entries3 = _entries(["2", "3"])
    merged, changed = merge_record(folder, "s", ["cmd2"], params3, entries3)
    assert changed
    assert [p["run"] for p in merged["points"]] == ["s/lr-1", "s/lr-2", "s/lr-3"]
    assert merged["params"] == {"consolidate.lr": ["1", "2", "3"]}
    assert merged["command"] == ["cmd"] and merged["added"][0]["points"] == ["s/lr-3"]


def test_record_of_other_keys_is_refused(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    params, entries = _entries(["1", "2"])
    (folder / RECORD).write_text(json.dumps(merge_record(folder, "s", ["cmd"], params, entries)[0]))
    other = expand(["extract.seeds=1,2"])
    with pytest.raises(ConfigError, match="sweeps consolidate.lr; this command sweeps extract.seeds"):
        merge_record(folder, "s", ["cmd"], other.params, [])


def test_a_run_is_no_sweep_folder(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "manifest.json").write_text("{}")
    params, entries = _entries(["1", "2"])
    with pytest.raises(ConfigError, match="is a run"):
        merge_record(tmp_path / "s", "s", ["cmd"], params, entries)


# ---------------------------------------------------------------------------------------------------------------
# run.name and the run directory

def test_run_name_of_a_point(cfg_factory, tmp_path):
    from oel_hpc.config import check_schema

    cfg = cfg_factory([f"run.root={tmp_path}", "run.name=s/lr-1"])
    check_schema(cfg)
    with pytest.raises(StageConflict, match="holds no sweep.json"):
        guard.check_run_dir(cfg)
    assert guard.check_run_dir(cfg, in_sweep=True).root == tmp_path / "s" / "lr-1"
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / RECORD).write_text("{}")
    assert guard.check_run_dir(cfg).root == tmp_path / "s" / "lr-1"
    with pytest.raises(StageConflict, match="is a sweep"):
        guard.check_run_dir(cfg_factory([f"run.root={tmp_path}", "run.name=s"]))
    for bad in ("s/a/b", "s/", "/s", "s/..", "s/-x"):
        with pytest.raises(ConfigError) as e:
            check_schema(cfg_factory([f"run.root={tmp_path}", f"run.name='{bad}'"]))
        assert e.value.key == "run.name"


def test_a_symlinked_sweep_folder_may_not_lead_outside(cfg_factory, tmp_path):
    root, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    (root / "s").symlink_to(elsewhere)
    with pytest.raises(StageConflict, match="outside run.root"):
        guard.check_run_dir(cfg_factory([f"run.root={root}", "run.name=s/p"]), in_sweep=True)


# ---------------------------------------------------------------------------------------------------------------
# The command line (no stage runs: printing, rendering, refusing)

def oel(*args, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    return subprocess.run([sys.executable, "-m", "oel_hpc", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_cfg_job_prints_every_point():
    out = oel("-m", "run.name=s", "consolidate.lr=1e-6,3e-6", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    heads = [line for line in out.stdout.splitlines() if line.startswith("# sweep point")]
    assert heads == ["# sweep point s/lr-1e-06: run.name=s consolidate.lr=1e-06",
                     "# sweep point s/lr-3e-06: run.name=s consolidate.lr=3e-06"]
    assert out.stdout.count("name: s/lr-") == 2


def test_a_bad_point_refuses_the_whole_sweep_before_anything_is_written(tmp_path):
    out = oel("-m", f"run.root={tmp_path}", "run.name=s", "cluster=local_slurm", "launch.render_only=true",
              "consolidate.lr=1e-6,-3")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "oel_hpc: error: consolidate.lr: sweep point lr--3 (consolidate.lr=-3): must be in (0, 1], got -3.0"]
    assert list(tmp_path.iterdir()) == []


def test_points_of_different_run_names_need_a_sweep_name(tmp_path):
    out = oel("-m", f"run.root={tmp_path}", "experiment=tiny,smollm2_frozenlake", "--cfg", "job")
    assert out.returncode == 2
    assert "run.name: the sweep's points have different run names" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_sweep_without_m_says_how(tmp_path):
    out = oel(f"run.root={tmp_path}", "consolidate.lr=1e-6,3e-6")
    assert out.returncode == 2 and "--multirun" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_render_only_renders_every_point(tmp_path):
    out = oel("-m", f"run.root={tmp_path}", "run.name=s", "cluster=local_slurm", "launch.render_only=true",
              "consolidate.lr=1e-6,3e-6")
    assert out.returncode == 0, out.stderr
    record = json.loads((tmp_path / "s" / RECORD).read_text())
    assert [p["run_dir"] for p in record["points"]] == ["lr-1e-06", "lr-3e-06"]
    for point in record["points"]:
        run_dir = tmp_path / "s" / point["run_dir"]
        script = (run_dir / "slurm" / "r1_extract.sbatch").read_text()
        assert f"--job-name=oel:{point['run']}:r1:extract" in script
        config = (run_dir / "config.yaml").read_text()
        assert f"name: {point['run']}" in config
    lrs = [float(re.search(r"^  lr: (\S+)$", (tmp_path / "s" / p["run_dir"] / "config.yaml").read_text(),
                           re.M)[1]) for p in record["points"]]
    assert lrs == [1e-6, 3e-6]
    assert "s/lr-1e-06" in out.stdout and "s/lr-3e-06" in out.stdout


def test_plan_of_a_sweep_prints_every_point_and_the_total_and_writes_nothing(tmp_path):
    out = oel("-m", f"run.root={tmp_path}", "run.name=s", "cluster=local_slurm", "launch.plan_only=true",
              "extract.seeds=2,3", "cluster.resources.extract.time_min=30")
    assert out.returncode == 0, out.stderr
    assert [line for line in out.stdout.splitlines() if line.startswith("== sweep")] == [
        "== sweep 's' point s/seeds-2", "== sweep 's' point s/seeds-3"]
    # extraction: (2 + 3) tasks x 1 node x 1 task x 1 CPU x 30 min; the other stages as in each point's own plan
    per_point = [float(m) for m in re.findall(r"^  total .* ([\d.]+) CPU-hours", out.stdout, re.M)]
    assert len(per_point) == 2 and per_point[1] - per_point[0] == pytest.approx(0.5, abs=0.051)
    total = re.search(r"^Sweep 's': 2 points, 10 sbatch calls, at most 0\.0 GPU-hours and ([\d.]+) CPU-hours",
                      out.stdout, re.M)
    assert total and float(total[1]) == pytest.approx(sum(per_point), abs=0.051), out.stdout[-500:]
    assert list(tmp_path.iterdir()) == []


def test_without_sbatch_nothing_is_written(tmp_path):
    import shutil

    path = f"{Path(sys.executable).parent}:/nonexistent"
    if shutil.which("sbatch", path=path):
        pytest.skip("sbatch is on the minimal PATH")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PATH=path)
    out = subprocess.run([sys.executable, "-m", "oel_hpc", "-m", "hydra/launcher=submitit_slurm",
                          f"run.root={tmp_path}", "run.name=s", "wandb.mode=disabled", "extract.seeds=1,2"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("oel_hpc: error: sbatch not found"), out.stderr
    assert list(tmp_path.iterdir()) == []


def test_m_without_a_swept_value_is_one_run(tmp_path):
    out = oel("-m", f"run.root={tmp_path}", "consolidate.lr=1e-6", "--cfg", "job")
    assert out.returncode == 0, out.stderr
    assert "# sweep point" not in out.stdout and "name: tiny-frozenlake\n" in out.stdout
    assert list(tmp_path.iterdir()) == []


def test_cfg_hydra_with_a_sweep_is_refused_in_one_line():
    out = oel("-m", "consolidate.lr=1e-6,3e-6", "--cfg", "hydra")
    assert out.returncode == 2 and out.stderr.startswith("oel_hpc: error: --cfg: hydra shows one config")
    assert len(out.stderr.strip().splitlines()) == 1
