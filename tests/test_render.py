"""sbatch rendering without a cluster: quoting and hostile values, the container command lines (Apptainer and
pyxis), the consolidation's USR2 forwarding, the cluster presets, the hydra.launcher mapping, the committed
`slurm/` rendering, and secrets. Rendered scripts are executed by bash against stand-in binaries that record their
argv, so "quoted" means "bash ran exactly these words", not "the text looks quoted"."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from oel_hpc.config import CONF_DIR, ConfigError, validate
from oel_hpc.launch import render
from oel_hpc.pipeline import build_dag
from tests.conftest import ROOT, compose

PRESETS = ("local_slurm", "a100", "h100", "b200")
GPU_PRESETS = ("a100", "h100", "b200")
RECIPES = ("sokoban_qwen3_4b_instruct", "frozenlake_qwen3_1_7b", "frozenlake_qwen3_4b", "frozenlake_qwen3_8b")
COMMITTED = ROOT / "slurm" / "sokoban_qwen3_4b_instruct"
# cluster.python=python: the committed scripts run `python` from the PATH of your jobs (the default, null, would write
# the interpreter that renders them: a path of this machine)
COMMITTED_ARGS = ["experiment=sokoban_qwen3_4b_instruct", "cluster=h100", "cluster.python=python",
                  "run.root=/path/to/runs", "launch.render_only=true"]
SECRETS = {"WANDB_API_KEY": "wandb-secret-7f3e9a1c", "HF_TOKEN": "hf_secretToken4b2d"}


def slurm_cfg(*overrides, preset="local_slurm"):
    # cluster.python=python: the rendered scripts run the recording stand-in `python` on the test PATH
    return compose([f"cluster={preset}", "cluster.python=python", *overrides])


def setting(cfg, key, value):
    """cfg with `key` set to `value` as given (no override parsing: newlines, quotes and backslashes intact)."""
    OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def nodes_of(cfg):
    return {n.id: n for n in build_dag(cfg)}


def script(cfg, node_id, run_dir):
    return render.render_script(cfg, Path(run_dir), nodes_of(cfg)[node_id])


def oel(*args, env=None, cwd=ROOT, timeout=120):
    return subprocess.run([sys.executable, "-m", "oel_hpc", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
# Running a rendered script under bash with recording stand-ins

def fake_bin(folder: Path, name: str, body: str = "") -> Path:
    """An executable `name` that appends [name, *argv] as one JSON line to $OEL_REC, then runs `body` (bash)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(f"#!/bin/bash\n{sys.executable} -c 'import json,os,sys; "
                    "open(os.environ[\"OEL_REC\"],\"a\").write(json.dumps(sys.argv[1:])+\"\\n\")' "
                    f"{json.dumps(name)} \"$@\"\n{body}\n")
    path.chmod(0o755)
    return path


def run_rendered(text: str, tmp_path: Path, env_extra=None, fakes=("python", "apptainer", "srun")):
    bin_dir = tmp_path / "bin"
    for name in fakes:
        fake_bin(bin_dir, name)
    fake_bin(bin_dir, "scontrol", 'echo node001; echo node002')
    rec = tmp_path / "rec.jsonl"
    rec.unlink(missing_ok=True)
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OEL_REC": str(rec), "SLURM_JOB_ID": "4242",
           "SLURM_ARRAY_TASK_ID": "3", "SLURM_CPUS_PER_TASK": "2", "SLURM_JOB_NODELIST": "node[001-002]",
           "HOME": str(tmp_path), **(env_extra or {})}
    out = subprocess.run(["bash", str(path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in rec.read_text().splitlines()] if rec.exists() else []
    return out, calls


HOSTILE_ROOT = "runs $(touch PWNED1) `touch PWNED2`; touch PWNED3 'q' \"dq\" \\ end"


def test_sbatch_values_are_bare_or_double_quoted():
    assert render.sbatch_value("k", "debug") == "debug"
    assert render.sbatch_value("k", "gpu:8") == "gpu:8"
    assert render.sbatch_value("k", "a b") == '"a b"'
    assert render.sbatch_value("k", 'x"y\\z #c') == '"x\\"y\\\\z #c"'
    assert render.sbatch_value("k", "x;y") == '"x;y"'
    for bad in ("debug\ntouch pwned", "a\rb", "a\x00b", "tab\there"):
        with pytest.raises(ConfigError):
            render.sbatch_value("k", bad)


def test_rendered_script_runs_exactly_the_worker_with_hostile_paths(tmp_path):
    root = tmp_path / HOSTILE_ROOT
    cfg = setting(setting(slurm_cfg(), "run.root", str(root)), "cluster.python", "python; touch PWNED4")
    run_dir = root / cfg.run.name
    text = script(cfg, "r1/extract", run_dir)
    fake_bin(tmp_path / "bin", "python; touch PWNED4")
    out, calls = run_rendered(text, tmp_path)
    assert out.returncode == 0, out.stderr
    assert calls == [["python; touch PWNED4", "-m", "oel_hpc.worker", str(run_dir), "r1/extract"]]
    assert not list(tmp_path.rglob("PWNED*")) and not list(Path.cwd().glob("PWNED*"))
    # the #SBATCH lines hold the hostile path in sbatch's double quotes, on one line each
    comment = next(line for line in text.splitlines() if line.startswith("#SBATCH --comment="))
    assert comment.startswith('#SBATCH --comment="oel_hpc run=') and comment.endswith(' stage=r1/extract"')
    assert "OMP_NUM_THREADS" in text and "exec " in text


def test_hostile_values_in_sbatch_fields_are_refused_or_quoted(tmp_path):
    # a newline would start a shell line of its own: refused by validation and by the renderer
    for override in ["cluster.partition='debug\ntouch pwned'", "cluster.account='a\nb'",
                     "cluster.container='img.sif\ntouch pwned'", "cluster.python='python\ntouch pwned'"]:
        cfg = slurm_cfg(override)
        with pytest.raises(ConfigError):
            validate(cfg, check_files=False)
        with pytest.raises(ConfigError):
            render.render_run(cfg, tmp_path, build_dag(cfg))
    cfg = setting(setting(slurm_cfg(), "cluster.partition", 'gpu" --wrap="touch pwned'), "cluster.qos", "normal # x")
    validate(cfg, check_files=False)
    text = script(cfg, "r1/gather", tmp_path)
    assert '#SBATCH --partition="gpu\\" --wrap=\\"touch pwned"' in text
    assert '#SBATCH --qos="normal # x"' in text
    out, calls = run_rendered(text, tmp_path)
    assert out.returncode == 0 and calls == [["python", "-m", "oel_hpc.worker", str(tmp_path), "r1/gather"]]
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.parametrize("line", ["module load x\ntouch pwned", "echo 'unterminated", "export A=1 \\",
                                  "cat <<EOF", "if true; then", "echo $(", "{ echo hi"])
def test_bad_setup_lines_are_refused(line, tmp_path):
    cfg = setting(slurm_cfg(), "cluster.setup", [line])
    with pytest.raises(ConfigError, match=r"cluster\.setup\[0\]"):
        validate(cfg, check_files=False)
    with pytest.raises(ConfigError):
        script(cfg, "r1/extract", tmp_path)


@pytest.mark.parametrize("line", ["touch pwned", "--mail-type=END\n--wrap=x", "#SBATCH --x"])
def test_bad_extra_sbatch_lines_are_refused(line):
    cfg = setting(slurm_cfg(), "cluster.extra_sbatch", [line])
    with pytest.raises(ConfigError, match=r"cluster\.extra_sbatch\[0\]"):
        validate(cfg, check_files=False)


def test_setup_lines_run_first_and_cannot_swallow_the_worker(tmp_path):
    """Setup lines are shell code by design: they run in order, under set -e, and the worker still runs once."""
    setup = ["export OEL_FROM_SETUP=1", "echo setup-ran \"# not a comment\" # a comment with a ' quote",
             "true && echo 'second; line'"]
    cfg = setting(slurm_cfg("cluster.extra_sbatch=['--mail-type=END']"), "cluster.setup", setup)
    validate(cfg, check_files=False)
    text = script(cfg, "r1/deploy", tmp_path)
    assert "#SBATCH --mail-type=END" in text
    lines = text.splitlines()
    assert lines.index("set -eo pipefail") < lines.index(setup[0]) < lines.index(setup[1])
    # sbatch reads directives only up to the first command: none may follow a shell line
    first_cmd = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert not any(line.startswith("#SBATCH") for line in lines[first_cmd:])
    out, calls = run_rendered(text, tmp_path)
    assert out.returncode == 0, out.stderr
    assert "setup-ran # not a comment" in out.stdout and "second; line" in out.stdout
    assert calls == [["python", "-m", "oel_hpc.worker", str(tmp_path), "r1/deploy"]]
    # a failing setup line stops the job before the worker
    bad = slurm_cfg("cluster.setup=[false]")
    out, calls = run_rendered(script(bad, "r1/deploy", tmp_path), tmp_path)
    assert out.returncode != 0 and calls == []


def test_directives_follow_the_config(tmp_path):
    cfg = slurm_cfg("cluster.account=proj", "cluster.qos=high", "cluster.constraint='a100&ib'",
                    "cluster.gpus_per_node=1", "cluster.gpu_type=a100", "cluster.mem_gb=32",
                    "cluster.resources.consolidate.nodes=2", "cluster.resources.consolidate.tasks_per_node=4",
                    "cluster.resources.consolidate.gpus_per_node=4", "cluster.resources.consolidate.exclusive=true",
                    "cluster.signal_before_end_s=90", "cluster.requeue=false")
    nodes = nodes_of(cfg)
    ext = dict(render.directives(cfg, tmp_path, nodes["r1/extract"]))
    assert ext["--job-name"] == f"oel:{cfg.run.name}:r1:extract" and ext["--array"] == "0-1"
    assert ext["--comment"] == f"oel_hpc run={tmp_path} stage=r1/extract"
    assert ext["--output"] == str(tmp_path / "logs" / "r1_extract_%A_%a.out")
    assert (ext["--partition"], ext["--account"], ext["--qos"], ext["--constraint"]) == ("debug", "proj", "high",
                                                                                       "a100&ib")
    assert (ext["--gres"], ext["--mem"], ext["--time"], ext["--nodes"]) == ("gpu:a100:1", "32G", "10", "1")
    assert "--no-requeue" in ext and "--signal" not in ext and ext["--export"] == "ALL"
    con = dict(render.directives(cfg, tmp_path, nodes["r1/consolidate"]))
    assert (con["--nodes"], con["--ntasks-per-node"], con["--gres"]) == ("2", "4", "gpu:a100:4")
    assert con["--signal"] == "B:USR2@90" and "--exclusive" in con and "--array" not in con
    assert con["--output"] == str(tmp_path / "logs" / "r1_consolidate_%j.out")
    ev = dict(render.directives(cfg, tmp_path, nodes["r1/evaluate"]))
    assert ev["--array"] == "0,2" and ev["--job-name"].endswith(":r1:evaluate")


def test_consolidation_runs_srun_and_forwards_usr2(tmp_path):
    cfg = slurm_cfg()
    text = script(cfg, "r1/consolidate", tmp_path)
    assert "#SBATCH --signal=B:USR2@30" in text and "#SBATCH --requeue" in text
    # an srun that records its argv and the environment it got, then waits; on USR2 it "checkpoints" and exits 75
    bin_dir = tmp_path / "bin"
    fake_bin(bin_dir, "srun", body=(
        'echo "$MASTER_ADDR $MASTER_PORT $OMP_NUM_THREADS" > "$OEL_REC.env"\n'
        'trap \'touch "$OEL_REC.usr2"; exit 75\' USR2\n'
        'touch "$OEL_REC.ready"; for i in $(seq 300); do sleep 0.1; done; exit 1'))
    fake_bin(bin_dir, "scontrol", "echo node001; echo node002")
    rec = tmp_path / "rec.jsonl"
    path = tmp_path / "job.sbatch"
    path.write_text(text)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "OEL_REC": str(rec), "SLURM_JOB_ID": "20017",
           "SLURM_CPUS_PER_TASK": "1", "SLURM_JOB_NODELIST": "node[001-002]", "MASTER_ADDR": "stale-host"}
    proc = subprocess.Popen(["bash", str(path)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 20
        while not Path(f"{rec}.ready").exists():
            assert time.monotonic() < end and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR2)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, err  # the step's exit status is the job's
    assert Path(f"{rec}.usr2").exists() and "USR2 received" in err
    calls = [json.loads(line) for line in rec.read_text().splitlines()]
    assert calls == [["scontrol", "show", "hostnames", "node[001-002]"],
                     ["srun", "--kill-on-bad-exit=1", "python", "-m", "oel_hpc.worker", str(tmp_path),
                      "r1/consolidate"]]
    assert Path(f"{rec}.env").read_text().split() == ["node001", str(20000 + 20017 % 20000), "1"]


def test_apptainer_command_lines(tmp_path):
    model = tmp_path / "my model"
    shutil.copytree(CONF_DIR.parent / "oel_hpc" / "assets" / "tiny-qwen3", model)
    image = tmp_path / "images" / "oel $(touch PWNED).sif"
    cfg = slurm_cfg("cluster.container_binds=[/scratch/hf]", "cluster.resources.extract.gpus_per_node=1")
    cfg = setting(setting(cfg, "model.path", str(model)), "cluster.container", str(image))
    validate(cfg, check_files=False)
    run_dir = tmp_path / "runs" / "tiny-frozenlake"
    binds = f"{run_dir},{model},/scratch/hf"
    out, calls = run_rendered(script(cfg, "r1/extract", run_dir), tmp_path)
    assert out.returncode == 0, out.stderr
    assert calls == [["apptainer", "exec", "--nv", "--bind", binds, str(image), "python", "-m", "oel_hpc.worker",
                      str(run_dir), "r1/extract"]]
    out, calls = run_rendered(script(cfg, "r1/gather", run_dir), tmp_path)  # no GPU: no --nv
    assert calls == [["apptainer", "exec", "--bind", binds, str(image), "python", "-m", "oel_hpc.worker",
                      str(run_dir), "r1/gather"]]
    assert render.stage_command(cfg, run_dir, nodes_of(cfg)["r1/consolidate"]) == [
        "srun", "--kill-on-bad-exit=1", "apptainer", "exec", "--bind", binds, str(image), "python", "-m",
        "oel_hpc.worker", str(run_dir), "r1/consolidate"]
    assert not list(tmp_path.rglob("PWNED"))
    # a bind path Apptainer cannot express is refused
    with pytest.raises(ConfigError, match="container_binds"):
        validate(setting(slurm_cfg("cluster.container_binds=['/a:b']"), "cluster.container", str(image)),
                 check_files=False)


def test_pyxis_command_lines(tmp_path):
    cfg = setting(slurm_cfg("cluster.container_runtime=pyxis"), "cluster.container",
                  "nvcr.io#nvidia/pytorch:25.01-py3")
    run_dir = tmp_path / "runs" / "x"
    model = Path(str(cfg.model.path))
    mounts = f"--container-mounts={run_dir}:{run_dir},{model}:{model}"
    out, calls = run_rendered(script(cfg, "r1/evaluate", run_dir), tmp_path)
    assert out.returncode == 0, out.stderr
    assert calls == [["srun", "--ntasks=1", "--container-image=nvcr.io#nvidia/pytorch:25.01-py3", mounts, "python",
                      "-m", "oel_hpc.worker", str(run_dir), "r1/evaluate"]]
    assert render.stage_command(cfg, run_dir, nodes_of(cfg)["r1/consolidate"])[:3] == [
        "srun", "--kill-on-bad-exit=1", "--container-image=nvcr.io#nvidia/pytorch:25.01-py3"]
    with pytest.raises(ConfigError, match="container_runtime"):
        validate(slurm_cfg("cluster.container_runtime=docker"), check_files=False)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("recipe", ("tiny", *RECIPES))
def test_presets_compose_and_validate(preset, recipe, tmp_path):
    cfg = compose([f"experiment={recipe}", f"cluster={preset}", f"run.root={tmp_path}"])
    validate(cfg, check_files=False)
    c = cfg.cluster
    assert c.launcher == "slurm" and c.name == preset
    assert (c.account, c.qos, c.constraint) == (None, None, None)
    files = render.render_run(cfg, tmp_path / cfg.run.name, build_dag(cfg))
    assert len(files) == 5 * cfg.pipeline.rounds + 1
    con = c.resources.consolidate
    if preset == "local_slurm":
        assert (c.partition, c.gpus_per_node, con.nodes, con.tasks_per_node) == ("debug", 0, 1, 2)
        assert all(c.resources[s].time_min <= 15 for s in c.resources)
    else:
        assert (con.nodes, con.tasks_per_node, con.gpus_per_node, con.exclusive) == (2, 8, 8, True)
        for stage in ("extract", "deploy", "evaluate", "gather"):
            assert (c.resources[stage].nodes, c.resources[stage].tasks_per_node) == (1, 1)
        assert "#SBATCH --gres=gpu:8" in files["r1_consolidate.sbatch"]
        assert "#SBATCH --gres=gpu:1" in files["r1_extract.sbatch"]
        assert "--gres" not in files["r1_gather.sbatch"]


def test_local_stays_the_default():
    cfg = compose([])
    assert (cfg.cluster.name, cfg.cluster.launcher) == ("local", "local")


def test_bad_cluster_values_name_the_key():
    for override, key in [("cluster.resources.extract.time_min=0", "cluster.resources.extract.time_min"),
                          ("cluster.resources.extract.nodes=2", "cluster.resources.extract"),
                          ("cluster.signal_before_end_s=100000", "cluster.signal_before_end_s"),
                          ("cluster.partition=''", "cluster.partition"),
                          ("run.root=/tmp/100%", "run.root")]:
        with pytest.raises(ConfigError) as e:
            validate(slurm_cfg(override), check_files=False)
        assert e.value.key == key, (override, e.value)


def test_hydra_launcher_values_map_onto_the_cluster():
    from oel_hpc.__main__ import compose_config

    cfg = compose_config(["-m", "hydra/launcher=submitit_slurm", "cluster=local_slurm",
                          "hydra.launcher.partition=high", "hydra.launcher.account=proj", "hydra.launcher.qos=q1",
                          "hydra.launcher.constraint=ib", "hydra.launcher.timeout_min=7",
                          "hydra.launcher.gpus_per_node=1", "hydra.launcher.cpus_per_task=3",
                          "hydra.launcher.mem_gb=4", "hydra.launcher.nodes=1", "hydra.launcher.tasks_per_node=1",
                          "hydra.launcher.signal_delay_s=20", "hydra.launcher.setup=[module load x]",
                          "++hydra.launcher.additional_parameters={mail-type:END,exclusive:null}",
                          "+hydra.launcher.additional_parameters.wckey=w1",
                          "hydra.launcher.exclude=node7"])
    c = cfg.cluster
    assert "hydra" not in cfg and c.launcher == "slurm"
    assert (c.partition, c.account, c.qos, c.constraint) == ("high", "proj", "q1", "ib")
    assert {c.resources[s].time_min for s in c.resources} == {7}
    assert (c.gpus_per_node, c.cpus_per_task, c.mem_gb, c.signal_before_end_s) == (1, 3, 4, 20)
    assert (c.resources.consolidate.nodes, c.resources.consolidate.tasks_per_node) == (1, 1)
    assert list(c.setup) == ["module load x"]
    assert list(c.extra_sbatch) == ["--mail-type=END", "--exclusive", "--wckey=w1", "--exclude=node7"]
    validate(cfg, check_files=False)
    # the default cluster=local becomes a Slurm run too when Hydra's launcher is asked for
    assert compose_config(["hydra/launcher=submitit_slurm"]).cluster.launcher == "slurm"
    with pytest.raises(ConfigError, match="hydra.launcher.gres"):
        compose_config(["hydra/launcher=submitit_slurm", "hydra.launcher.gres=gpu:2"])
    with pytest.raises(ConfigError, match="hydra/launcher=submitit_slurm"):
        compose_config(["cluster=local_slurm", "hydra.launcher.partition=x"])


def test_cfg_job_shows_the_slurm_config_and_submits_nothing(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    env.pop("SLURM_CONF", None)
    out = oel("-m", "hydra/launcher=submitit_slurm", "cluster=local_slurm", "hydra.launcher.partition=high",
              f"run.root={tmp_path}", "--cfg", "job", env=env)
    assert out.returncode == 0, out.stderr
    shown = OmegaConf.create(out.stdout)
    assert shown.cluster.partition == "high" and shown.cluster.launcher == "slurm"
    assert not any(tmp_path.iterdir())


def test_slurm_errors_are_one_line_exit_2(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/nonexistent"}
    env.pop("SLURM_CONF", None)
    if shutil.which("sbatch", path=env["PATH"]):
        pytest.skip("sbatch is on the minimal PATH")
    out = oel("cluster=local_slurm", f"run.root={tmp_path}", "wandb.mode=disabled", env=env)
    assert out.returncode == 2 and out.stderr.startswith("oel_hpc: error: sbatch not found"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    out = oel("-m", "hydra/launcher=submitit_slurm", "extract.seeds=1,2", f"run.root={tmp_path}", env=env)
    assert out.returncode == 2 and "oel_hpc: error:" in out.stderr, out.stderr
    out = oel("cluster=local_slurm", "cluster.partition='a\nb'", f"run.root={tmp_path}", env=env)
    assert out.returncode == 2 and "cluster.partition" in out.stderr
    out = oel("cluster=local_slurm", "run.name=../escape", f"run.root={tmp_path}", env=env)
    assert out.returncode == 2 and "run.name" in out.stderr


def test_run_directory_cannot_escape_the_root(tmp_path):
    from oel_hpc.launch.guard import check_run_dir
    from oel_hpc.pipeline import StageConflict

    root = tmp_path / "runs"
    root.mkdir()
    (root / "tiny-frozenlake").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(StageConflict, match="outside run.root"):
        check_run_dir(slurm_cfg(f"run.root={root}"))
    assert check_run_dir(slurm_cfg(f"run.root={tmp_path}", "run.name=ok")).root == tmp_path / "ok"


def test_render_only_writes_scripts_config_and_submits_nothing(tmp_path):
    out = oel("cluster=local_slurm", f"run.root={tmp_path}", "launch.render_only=true", "wandb.mode=disabled")
    assert out.returncode == 0, out.stderr
    run = tmp_path / "tiny-frozenlake"
    assert sorted(p.name for p in (run / "slurm").iterdir()) == sorted(
        [f"r1_{s}.sbatch" for s in ("extract", "gather", "deploy", "consolidate", "evaluate")] + ["submit.sh"])
    assert (run / "logs").is_dir() and not (run / "manifest.json").exists()
    cfg = OmegaConf.load(run / "config.yaml")
    assert cfg.launch.render_only is False and cfg.cluster.name == "local_slurm"
    assert [n.hash for n in build_dag(cfg)] == [n.hash for n in build_dag(compose([]))]  # the run's hashes
    sub = (run / "slurm" / "submit.sh").read_text()
    assert "cp \"$here/config.yaml\"" not in sub and "--dependency=afterok:${r1_gather}:${r1_deploy}" in sub


def test_committed_rendering_matches_the_code(tmp_path):
    """slurm/sokoban_qwen3_4b_instruct/ is what `COMMITTED_ARGS launch.render_dir=...` writes today."""
    out = oel(*COMMITTED_ARGS, f"launch.render_dir={tmp_path / 'fresh'}")
    assert out.returncode == 0, out.stderr
    fresh = {p.name: p.read_text() for p in (tmp_path / "fresh").iterdir()}
    committed = {p.name: p.read_text() for p in COMMITTED.iterdir()}
    assert sorted(fresh) == sorted(committed), "re-render slurm/ (see slurm/README.md)"
    for name in fresh:
        assert fresh[name] == committed[name], f"slurm/{COMMITTED.name}/{name} drifted: re-render (slurm/README.md)"
    assert len([n for n in fresh if n.endswith(".sbatch")]) == 15
    text = fresh["r1_consolidate.sbatch"]
    assert "#SBATCH --nodes=2" in text and "#SBATCH --ntasks-per-node=8" in text and "#SBATCH --gres=gpu:8" in text
    assert "/path/to/runs/sokoban_qwen3_4b_instruct" in text
    assert not re.search(r"/(tmp|work|root|home)/", "".join(fresh.values()))  # no path of this machine


def test_no_secret_reaches_a_rendered_file(tmp_path):
    env = {**os.environ, **SECRETS}
    out = oel("cluster=local_slurm", f"run.root={tmp_path}", "launch.render_only=true", "wandb.mode=disabled",
              env=env)
    assert out.returncode == 0, out.stderr
    for path in tmp_path.rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            for secret in SECRETS.values():
                assert secret not in text, path
    for secret in SECRETS.values():
        assert secret not in out.stdout + out.stderr
    assert "--export=ALL" in (tmp_path / "tiny-frozenlake" / "slurm" / "r1_extract.sbatch").read_text()


@pytest.mark.parametrize("name", ["oel-x86.def", "oel-b200.def"])
def test_container_definitions_pin_what_they_install(name):
    text = (ROOT / "containers" / name).read_text()
    base = re.search(r"^From:\s*(\S+)$", text, re.M)[1]
    assert re.match(r"^nvidia/cuda:\d+\.\d+\.\d+-[\w.-]+$", base) and "latest" not in base
    assert re.search(r"^Bootstrap:\s*docker$", text, re.M)
    for section in ("%files", "%post", "%environment", "%test", "%labels"):
        assert f"\n{section}\n" in text
    installs = re.findall(r"pip install (.+)$", text, re.M)
    assert installs
    for line in installs:
        args = [a for a in line.split() if not a.startswith("--") and a != "-e"]
        assert all("==" in a or a in ("/opt/oel_hpc", "/opt/oel_hpc[vllm]") for a in args), line
    assert "torch==2.13.0" in text
    if name == "oel-b200.def":
        major, minor = map(int, re.match(r"nvidia/cuda:(\d+)\.(\d+)", base).groups())
        assert (major, minor) >= (12, 8) and "sm_100" in text  # Blackwell
    else:
        assert "sm_80" in text and "sm_90" in text
