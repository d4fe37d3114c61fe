"""Files a run writes are as readable as the umask says (mkstemp/mkdtemp's 0600/0700 would hide them from
colleagues on a shared cluster), run.umask sets that umask for the whole run, and run.group gives the run directory
a group its files inherit."""
from __future__ import annotations

import grp
import json
import os
import stat
from pathlib import Path

import pytest

from oel_hpc import rundir
from oel_hpc.config import ASSETS_DIR, validate
from oel_hpc.errors import ConfigError
from tests.conftest import compose


@pytest.fixture
def umask():
    """Set the process's umask for one test; the one before is restored after."""
    before = os.umask(0o022)
    fallback = rundir._umask_fallback

    def set_to(value: int) -> None:
        os.umask(value)

    yield set_to
    os.umask(before)
    rundir._umask_fallback = fallback


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def modes(folder: Path) -> dict[str, set[int]]:
    """{"files": the modes of every file below `folder`, "dirs": of every folder, itself included}."""
    found = {"files": set(), "dirs": {mode(folder) & 0o777}}
    for p in folder.rglob("*"):
        if not p.is_symlink():
            found["dirs" if p.is_dir() else "files"].add(mode(p) & 0o777)
    return found


class TinyTrainer:
    """What checkpoint.save asks of a backend, holding one real tensor."""

    def __init__(self):
        import torch

        self.state = {"model": {"w": torch.arange(4.0)}}

    def checkpoint_state(self):
        return self.state

    def checkpoint_meta(self):
        return {"trainer": "tiny"}


def write_like_a_stage(run: Path) -> None:
    """What stages write, through the same helpers: records, a checkpoint (DCP files, RNG, meta), an export."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oel_hpc.train import checkpoint

    rundir.write_json_atomic(run / "round_1" / "eval" / "step_1.json", {"pass_rate": 1.0})
    rundir.write_jsonl_atomic(run / "round_1" / "deploy" / "step_1.jsonl", [{"turn": 1}])
    checkpoint.save(run / "round_1" / "consolidate" / "ckpt", 1, TinyTrainer(), "hash")
    tiny = ASSETS_DIR / "tiny-qwen3"
    checkpoint.export_hf(AutoModelForCausalLM.from_pretrained(tiny), AutoTokenizer.from_pretrained(tiny),
                         run / "round_1" / "consolidate" / "hf")


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775),
                                                        (0o077, 0o600, 0o700)])
def test_outputs_get_the_modes_the_umask_gives(tmp_path, umask, mask, file_mode, dir_mode):
    umask(mask)
    run = tmp_path / "run"
    write_like_a_stage(run)
    hf = run / "round_1" / "consolidate" / "hf"
    assert (hf / "model.safetensors").is_file() and (run / "round_1" / "consolidate" / "ckpt" / "step_1").is_dir()
    assert list((run / "round_1" / "consolidate" / "ckpt" / "step_1").glob("*.distcp"))
    assert modes(run) == {"files": {file_mode}, "dirs": {dir_mode}}


def test_run_umask_is_the_whole_runs_umask(tmp_path, umask):
    rundir.share_run_dir(tmp_path / "run", "0002", None)
    write_like_a_stage(tmp_path / "run")
    assert modes(tmp_path / "run") == {"files": {0o664}, "dirs": {0o775}}
    assert rundir.current_umask() == 0o002


def test_run_group_gives_the_run_directory_its_group_and_setgid(tmp_path, umask):
    group = grp.getgrgid(os.getegid()).gr_name
    run = tmp_path / "runs" / "shared"
    rundir.share_run_dir(run, None, group)
    assert run.stat().st_mode & stat.S_ISGID and run.stat().st_gid == os.getegid()
    write_like_a_stage(run)
    for p in [run, *run.rglob("*")]:
        assert p.stat().st_gid == os.getegid(), p
        if p.is_dir():  # folders made inside keep passing the group on, temporary ones included
            assert p.stat().st_mode & stat.S_ISGID, p
    rundir.share_run_dir(run, None, group)  # again: nothing to change, nothing refused
    other = next((g for g in grp.getgrall() if g.gr_gid != os.getegid()), None)
    if os.geteuid() == 0 and other is not None:  # a run directory with another group is given run.group's
        os.chown(run, -1, other.gr_gid)
        rundir.share_run_dir(run, None, group)
        assert run.stat().st_gid == os.getegid() and run.stat().st_mode & stat.S_ISGID


def test_the_local_launcher_and_the_worker_apply_the_run_umask(tmp_path, umask, monkeypatch):
    from oel_hpc import worker
    from oel_hpc.launch import local
    from oel_hpc.pipeline import build_dag

    cfg = compose([f"run.root={tmp_path}", "run.umask=0002", "wandb.mode=disabled"])
    paths = rundir.RunPaths(tmp_path / cfg.run.name)
    wrote = []

    def fake_execute(ctx, node, task, redo_changed=False):
        wrote.append(oct(rundir.current_umask()))
        return 1

    monkeypatch.setattr(local, "execute", fake_execute)
    local.run_local(cfg, paths, build_dag(cfg)[:1], "runhash")
    assert wrote and set(wrote) == {"0o2"} and modes(paths.root)["files"] == {0o664}  # config.yaml, manifest.json
    assert mode(paths.root) == 0o775
    umask(0o022)  # a job starts with whatever umask its node gives it; the worker sets the run's
    with pytest.raises(ConfigError, match="no such stage"):
        worker.run(paths.root, "r9/nothing", None)
    assert rundir.current_umask() == 0o002


@pytest.mark.parametrize("value", ["22", "0022 ", "0o022", "0800", "01777", "18", "abc"])
def test_a_bad_umask_is_one_line_naming_the_key(value):
    cfg = compose(["wandb.mode=disabled"])
    cfg.run.umask = value
    with pytest.raises(ConfigError) as caught:
        validate(cfg, check_files=False)
    assert caught.value.key == "run.umask" and "\n" not in str(caught.value)


def test_a_quoted_umask_survives_yaml_and_a_bare_one_is_refused(tmp_path):
    from oel_hpc.config import load_run_config

    cfg = compose(["run.umask=0027", "wandb.mode=disabled"])
    validate(cfg, check_files=False)
    (tmp_path / "config.yaml").write_text(json.dumps({"run": {"umask": "0027"}}))
    assert rundir.parse_umask(load_run_config(tmp_path / "config.yaml").run.umask) == 0o027
    (tmp_path / "config.yaml").write_text("run:\n  umask: 0027\n")  # YAML reads the number 23
    with pytest.raises(ConfigError, match="run.umask"):
        rundir.parse_umask(load_run_config(tmp_path / "config.yaml").run.umask)


def test_an_unknown_group_or_one_the_user_is_not_in_is_refused():
    cfg = compose(["wandb.mode=disabled", "run.group=no-such-group-oel"])
    with pytest.raises(ConfigError, match="no group 'no-such-group-oel'") as caught:
        validate(cfg, check_files=False)
    assert caught.value.key == "run.group" and "\n" not in str(caught.value)
    mine = {os.getegid(), *os.getgroups()}
    foreign = next((g.gr_name for g in grp.getgrall() if g.gr_gid not in mine), None)
    if foreign is None:
        pytest.skip("this user is in every group of this machine")
    cfg.run.group = foreign
    with pytest.raises(ConfigError, match=f"is not in group '{foreign}'"):
        validate(cfg, check_files=False)


def test_the_slurm_launcher_writes_under_the_run_umask_and_group(tmp_path, umask):
    """What it writes before any job starts (config.yaml, scripts, logs/); sbatch then passes the umask on."""
    from oel_hpc.launch import slurm
    from oel_hpc.launch.guard import check_run_dir
    from oel_hpc.pipeline import build_dag

    group = grp.getgrgid(os.getegid()).gr_name
    cfg = compose(["cluster=local_slurm", f"run.root={tmp_path}", "run.umask=0002", f"run.group={group}",
                   "launch.render_only=true", "wandb.mode=disabled"])
    paths = check_run_dir(cfg)
    slurm.render_only(cfg, paths, build_dag(cfg))
    assert rundir.current_umask() == 0o002 and paths.root.stat().st_mode & stat.S_ISGID
    assert mode(paths.config) == 0o664 and mode(paths.root / "logs") & 0o777 == 0o775
    scripts = {p.suffix: mode(p) for p in (paths.root / "slurm").iterdir()}
    assert scripts == {".sbatch": 0o664, ".sh": 0o775}  # submit.sh is executable (sbatch reads the others)
