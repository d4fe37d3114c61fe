"""The Slurm launcher on the real local test cluster (tools/slurm/start.sh; skipped without SLURM_CONF).

One end-to-end run, shared by most tests through a module fixture: the user's command
`python -m oel_hpc -m hydra/launcher=submitit_slurm cluster=local_slurm pipeline.rounds=2 ...` with the tiny model,
secrets in its environment and an sbatch wrapper that counts calls; it detaches, the jobs run, and the tests read
sacct, the manifest, the files, and compare with a local run of the same config. Then: a second invocation submits
nothing; a lost seed is resubmitted alone. With stand-in stage bodies (cluster.python=<stub script>): a cancelled
array task is resubmitted alone while the rest stays queued, hand-submitted rendered scripts, hostile paths
through sbatch. Every wait polls with a timeout.

Consolidation runs with 1 task per job in the shared run; `test_two_rank_consolidation_matches_one_rank` runs the
preset's 1 node x 2 tasks once the distributed trainer is in (it skips until oel_hpc/train reads SLURM_PROCID;
OEL_TEST_TWO_RANKS=1 forces it).
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oel_hpc.rundir import read_jsonl
from tests import conftest
from tests.conftest import ROOT

POLL = 0.5
RUN_TIMEOUT = 420.0  # the whole 2-round tiny run; ~1 min when the cluster is idle
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}
SECRETS = {"WANDB_API_KEY": "wandb-secret-e2e-5d81c0", "HF_TOKEN": "hf_e2eSecret93ab"}
ONE_TASK = "cluster.resources.consolidate.tasks_per_node=1"
COMMON = ["wandb.mode=disabled", "pipeline.rounds=2"]
STAGES = ("extract", "gather", "deploy", "consolidate", "evaluate")


def _cluster_problem():
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF is not set: start the test cluster with eval \"$(tools/slurm/start.sh | tail -1)\""
    if shutil.which("sbatch") is None:
        return "sbatch is not installed (tools/slurm/start.sh installs Slurm)"
    try:
        r = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: is slurmctld running?"
    return None if r.returncode == 0 else f"sinfo fails: {r.stderr.strip()}"


@pytest.fixture(scope="module", autouse=True)
def _slurm_cluster():
    problem = _cluster_problem()
    if problem:
        pytest.skip(f"no Slurm test cluster: {problem}")


def wait_until(predicate, what, timeout):
    return conftest.wait_until(predicate, what, timeout, POLL)


def sacct(job_ids, fields="JobID,JobName,State,Submit,Start,End"):
    """{JobID: {field: value}}, one row per job / array task (`<id>_<task>`)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), f"--format={fields}"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    names = fields.split(",")
    rows = {}
    for line in out.stdout.splitlines():
        values = dict(zip(names, line.split("|")))
        values["State"] = values.get("State", "").split(" ")[0]
        rows[values["JobID"]] = values
    return rows


def queue_info(job_ids, fmt="%i|%j|%k"):
    """squeue rows (any state, while the controller still holds the jobs): sacct here does not store comments."""
    out = subprocess.run(["squeue", "-h", "--states=all", "-j", ",".join(job_ids), "-o", fmt], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return [line.split("|") for line in out.stdout.splitlines()]


def cancel(job_ids):
    if job_ids:
        subprocess.run(["scancel", *job_ids], capture_output=True, timeout=30)


def sbatch_wrapper(folder: Path) -> tuple[Path, Path]:
    """A folder with an `sbatch` that logs its argv (one JSON line per call) and runs the real one."""
    real = shutil.which("sbatch")
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "sbatch.jsonl"
    wrapper = folder / "sbatch"
    wrapper.write_text(f"#!/bin/bash\n{sys.executable} -c 'import json,sys; "
                       f"open(sys.argv[1],\"a\").write(json.dumps(sys.argv[2:])+\"\\n\")' {log} \"$@\"\n"
                       f"exec {real} \"$@\"\n")
    wrapper.chmod(0o755)
    return folder, log


def sbatch_calls(log: Path) -> list[list[str]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def hydra_quoted(value) -> str:
    """A value as one Hydra override string, whatever characters it holds."""
    return "'" + str(value).replace("'", "\\'") + "'"  # (no backslash in the values used here)


def oel(root, *overrides, env=None, timeout=120):
    argv = [sys.executable, "-m", "oel_hpc", "-m", "hydra/launcher=submitit_slurm", "cluster=local_slurm",
            f"run.root={hydra_quoted(root)}", *overrides]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def manifest(run):
    return json.loads((run / "manifest.json").read_text())


def all_job_ids(run):
    return [j for s in manifest(run)["stages"] for j in s["job_ids"] if j.isdigit()]


def dag_done(run):
    """Every task of the run's DAG has its DONE marker under the current hash."""
    from omegaconf import OmegaConf

    from oel_hpc.pipeline import build_dag, task_state
    from oel_hpc.rundir import RunPaths

    paths = RunPaths(run)
    nodes = build_dag(OmegaConf.load(paths.config))
    return all(task_state(paths, n, t) == "done" for n in nodes for t in n.task_ids())


def wait_for_run(run, timeout=RUN_TIMEOUT):
    """Until every DONE marker is there and every job has ended; fails at once when a job fails."""
    def finished():
        ids = all_job_ids(run)
        rows = sacct(ids)
        bad = {k: v["State"] for k, v in rows.items() if v["State"] in FINAL - {"COMPLETED"}}
        if bad:
            logs = "\n".join(f"--- {p.name}\n" + p.read_text()[-1500:] for p in sorted((run / "logs").glob("*")))
            pytest.fail(f"jobs failed: {bad}\n{logs}")
        ended = rows and all(v["State"] in FINAL for v in rows.values()) and not any(
            k in ids for k, v in rows.items() if "_" not in k and v["JobName"].endswith((":extract", ":evaluate")))
        return dag_done(run) and ended
    return wait_until(finished, f"run {run} to finish", timeout)


def snapshot(run):
    return {str(p.relative_to(run)): p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """The user's command, once, to completion; plus a local run of the same config for comparison."""
    base = tmp_path_factory.mktemp("slurm-e2e")
    root = base / "runs"
    bin_dir, log = sbatch_wrapper(base / "bin")
    env = {**os.environ, **SECRETS, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    t0 = time.monotonic()
    out = oel(root, *COMMON, ONE_TASK, env=env)
    submit_s = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    run = root / "tiny-frozenlake"
    queued = queue_info(all_job_ids(run))  # what squeue shows right after the submission
    try:
        wait_for_run(run)
    except BaseException:
        cancel(all_job_ids(run))
        raise
    calls = sbatch_calls(log)
    log.unlink()
    local_root = base / "local"  # the same config, run locally (after the jobs: both are CPU-bound)
    local = subprocess.run([sys.executable, "-m", "oel_hpc", f"run.root={local_root}", *COMMON], cwd=ROOT,
                           capture_output=True, text=True, timeout=900)
    assert local.returncode == 0, local.stderr[-3000:]
    return {"root": root, "run": run, "out": out, "submit_s": submit_s, "calls": calls, "env": env, "log": log,
            "local": local_root / "tiny-frozenlake", "queued": queued}


def round_of(call):
    return int(Path(call[-1]).name.split("_")[0][1:])


def test_user_command_submits_and_detaches(e2e):
    out = e2e["out"].stdout
    assert e2e["submit_s"] < 30, "the login process must return once the jobs are queued"
    assert "Submitted run 'tiny-frozenlake' to Slurm (10 sbatch calls: round 1: 5, round 2: 5)" in out
    assert f"python -m oel_hpc.status {e2e['run']}" in out
    for stage in STAGES:
        assert f"r1/{stage}" in out and f"r2/{stage}" in out


def test_at_most_six_sbatch_calls_per_round(e2e):
    calls = e2e["calls"]
    per_round = {}
    for call in calls:
        per_round[round_of(call)] = per_round.get(round_of(call), 0) + 1
    assert per_round == {1: 5, 2: 5}
    extract = [c for c in calls if c[-1].endswith("r1_extract.sbatch")]
    # every array is told its index offset (0: not split), so no job inherits a stale OEL_TASK_OFFSET
    assert extract == [["--parsable", "--array=0-1", "--export=ALL,OEL_TASK_OFFSET=0",
                        str(e2e["run"] / "slurm" / "r1_extract.sbatch")]]
    # the launcher submits exactly the scripts in the run directory
    assert all(Path(c[-1]).parent == e2e["run"] / "slurm" for c in calls)


def test_sacct_shows_one_extraction_array_and_jobs_after_it(e2e):
    run = e2e["run"]
    stages = {s["id"]: s for s in manifest(run)["stages"]}
    ids = {k: s["job_ids"][-1] for k, s in stages.items()}
    rows = sacct(list(ids.values()))
    for r in (1, 2):
        ext = ids[f"r{r}/extract"]
        assert sorted(k for k in rows if k.split("_")[0] == ext) == [f"{ext}_0", f"{ext}_1"]  # one task per seed
        ev = ids[f"r{r}/evaluate"]
        assert sorted(k for k in rows if k.split("_")[0] == ev) == [f"{ev}_0", f"{ev}_2"]  # one per checkpoint
        for stage in STAGES:
            job = ids[f"r{r}/{stage}"]
            mine = [v for k, v in rows.items() if k.split("_")[0] == job]
            assert mine and all(v["State"] == "COMPLETED" for v in mine), mine
            assert all(v["JobName"] == f"oel:tiny-frozenlake:r{r}:{stage}" for v in mine)
    # squeue right after the submission: names and comments readable, arrays indexed by seed / step
    for node, job in ids.items():
        rows_of_job = [row[1:] for row in e2e["queued"] if row[0].split("_")[0] == job]
        r, stage = node[1:].split("/")
        assert rows_of_job and all(row == [f"oel:tiny-frozenlake:r{r}:{stage}", f"oel_hpc run={run} stage={node}"]
                                   for row in rows_of_job), (node, e2e["queued"])
    extract_rows = [row[0] for row in e2e["queued"] if row[0].split("_")[0] == ids["r1/extract"]]
    assert extract_rows in (["%s_[0-1]" % ids["r1/extract"]], [f"{ids['r1/extract']}_{i}" for i in (0, 1)],
                            [f"{ids['r1/extract']}_{i}" for i in (1, 0)]), extract_rows  # indexed by seed

    def start(node):
        return min(v["Start"] for k, v in rows.items() if k.split("_")[0] == ids[node])

    def end(node):
        return max(v["End"] for k, v in rows.items() if k.split("_")[0] == ids[node])

    for r in (1, 2):  # ISO timestamps compare as strings
        assert start(f"r{r}/gather") >= end(f"r{r}/extract")
        assert start(f"r{r}/consolidate") >= max(end(f"r{r}/gather"), end(f"r{r}/deploy"))
        assert start(f"r{r}/evaluate") >= end(f"r{r}/consolidate")
    assert start("r2/extract") >= end("r1/consolidate") and start("r2/deploy") >= end("r1/consolidate")
    # deploy waits for nothing in round 1: it was submitted without a dependency
    sub = stages["r1/deploy"]["submissions"]
    assert sub[0]["dependency"] == [] and stages["r1/consolidate"]["submissions"][0]["dependency"] == [
        ids["r1/gather"], ids["r1/deploy"]]


def test_manifest_records_the_submissions(e2e):
    run = e2e["run"]
    for s in manifest(run)["stages"]:
        assert s["state"] == "submitted" and len(s["job_ids"]) == 1 and s["job_ids"][0].isdigit()
        assert s["script"] == f"slurm/r{s['round']}_{s['stage']}.sbatch" and (run / s["script"]).is_file()
        assert s["submitted"] and s["submissions"][0]["job_id"] == s["job_ids"][0]
        assert s["submissions"][0]["tasks"] == s["tasks"]


def test_outputs_match_a_local_run(e2e):
    run, local = e2e["run"], e2e["local"]
    files = [f"round_{r}/extract/seed_{s}/experience_{k}.txt" for r in (1, 2) for s in (0, 1) for k in (1, 3)]
    files += [f"round_{r}/deploy/step_{k}.jsonl" for r in (1, 2) for k in (1, 2)]
    files += [f"round_{r}/eval/step_{k}.json" for r in (1, 2) for k in (0, 2)]
    files += ["round_1/experience_list.json", "round_2/experience_list.json"]
    for rel in files:
        assert (run / rel).read_bytes() == (local / rel).read_bytes(), rel
    # consolidation: same losses (the timings differ)
    for r in (1, 2):
        a, b = (read_jsonl(d / f"round_{r}/consolidate/metrics.jsonl") for d in (run, local))
        assert [m["kl"] for m in a] == pytest.approx([m["kl"] for m in b], rel=1e-4)
    import torch
    from safetensors.torch import load_file

    for r in (1, 2):  # a job has 1 compute thread, the local run 2: float sums may differ in the last bits
        a, b = (load_file(d / f"round_{r}/consolidate/hf/model.safetensors") for d in (run, local))
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)


def test_no_secret_is_written_anywhere(e2e):
    run = e2e["run"]
    texts = [p for p in run.rglob("*") if p.is_file() and p.stat().st_size < 50_000_000]
    assert any(p.parent.name == "logs" for p in texts) and (run / "manifest.json") in texts
    for path in texts:
        data = path.read_bytes()
        for secret in SECRETS.values():
            assert secret.encode() not in data, path
    for secret in SECRETS.values():
        assert secret not in e2e["out"].stdout + e2e["out"].stderr


def test_second_invocation_submits_nothing(e2e):
    before = snapshot(e2e["run"])
    out = oel(e2e["root"], *COMMON, ONE_TASK, env=e2e["env"])
    assert out.returncode == 0, out.stderr
    assert "Nothing to do" in out.stdout
    assert sbatch_calls(e2e["log"]) == []
    assert snapshot(e2e["run"]) == before  # not a byte written


def test_a_lost_seed_is_resubmitted_with_what_was_made_from_it(e2e):
    """After the run: one seed's outputs and DONE are gone; the same command resubmits that array task only, and
    what gather recorded from it (gather, and the consolidation and evaluation made from its experience: gather's
    DONE names the seed's experience file, which no longer verifies) after it. The seed plays the same games again,
    so everything ends as it was."""
    import torch
    from safetensors.torch import load_file

    run = e2e["run"]
    seed_dir = run / "round_2" / "extract" / "seed_1"
    expected = (seed_dir / "experience_3.txt").read_bytes()
    weights = load_file(run / "round_2" / "consolidate" / "hf" / "model.safetensors")
    shutil.rmtree(seed_dir)
    out = oel(e2e["root"], *COMMON, ONE_TASK, env=e2e["env"])
    assert out.returncode == 0, out.stderr
    calls = sbatch_calls(e2e["log"])
    assert [Path(c[-1]).name for c in calls] == ["r2_extract.sbatch", "r2_gather.sbatch", "r2_consolidate.sbatch",
                                                 "r2_evaluate.sbatch"], calls
    assert calls[0][:2] == ["--parsable", "--array=1"], calls
    entry = next(s for s in manifest(run)["stages"] if s["id"] == "r2/extract")
    assert len(entry["job_ids"]) == 2 and entry["submissions"][-1]["tasks"] == [1]
    job = entry["job_ids"][-1]
    jobs = [s["job_ids"][-1] for s in manifest(run)["stages"] if s["id"].startswith("r2/")]
    try:
        wait_until(lambda: dag_done(run), "the resubmitted seed and what depends on it", RUN_TIMEOUT)
    except BaseException:
        cancel(jobs)
        raise
    assert sacct([job])[f"{job}_1"]["State"] == "COMPLETED" and list(sacct([job])) == [f"{job}_1"]
    assert (seed_dir / "experience_3.txt").read_bytes() == expected  # the same seed plays the same games
    redone = load_file(run / "round_2" / "consolidate" / "hf" / "model.safetensors")
    assert all(torch.equal(weights[k], redone[k]) for k in weights) and weights.keys() == redone.keys()


# ---------------------------------------------------------------------------------------------------------------
# Stand-in stage bodies: a script given as cluster.python records what it was run with, then sleeps.

STUB = """#!/bin/bash
out="$OEL_STUB_DIR/${SLURM_JOB_ID}.call"
printf '%s\\n' "$@" > "$out.tmp"
printf '%s' "${WANDB_API_KEY:-}" | sha256sum | cut -d' ' -f1 >> "$out.tmp"
mv "$out.tmp" "$out"
exec sleep "${OEL_STUB_SLEEP:-0}"  # exec: no child left behind when the job is cancelled
"""


@pytest.fixture
def stub(tmp_path):
    path = tmp_path / "stub python"
    path.write_text(STUB)
    path.chmod(0o755)
    calls = tmp_path / "calls"
    calls.mkdir()
    return path, calls


def test_a_cancelled_array_task_is_resubmitted_alone_while_the_rest_stays_queued(tmp_path, stub):
    stub_path, calls = stub
    root = tmp_path / "runs"
    bin_dir, log = sbatch_wrapper(tmp_path / "bin")
    env = {**os.environ, **SECRETS, "PATH": f"{bin_dir}:{os.environ['PATH']}", "OEL_STUB_DIR": str(calls),
           "OEL_STUB_SLEEP": "120"}
    overrides = ["wandb.mode=disabled", "run.name=stubbed", f"cluster.python={hydra_quoted(stub_path)}",
                 "launch.check_python=false"]  # the stub is no Python
    run = root / "stubbed"
    try:
        out = oel(root, *overrides, env=env)
        assert out.returncode == 0, out.stderr
        ids = {s["id"]: s["job_ids"][-1] for s in manifest(run)["stages"]}
        ext = ids["r1/extract"]
        # wait until seed 0 runs, then cancel seed 1 (running or pending)
        wait_until(lambda: sacct([ext]).get(f"{ext}_0", {}).get("State") == "RUNNING", "seed 0 to run", 60)
        cancel([f"{ext}_1"])
        wait_until(lambda: sacct([ext]).get(f"{ext}_1", {}).get("State") == "CANCELLED", "seed 1 cancelled", 60)
        log.unlink()
        out = oel(root, *overrides, env=env)
        assert out.returncode == 0, out.stderr
        calls_made = {Path(c[-1]).name: c for c in sbatch_calls(log)}
        assert sorted(calls_made) == ["r1_consolidate.sbatch", "r1_evaluate.sbatch", "r1_extract.sbatch",
                                      "r1_gather.sbatch"], out.stdout  # not deploy: still queued or running
        assert calls_made["r1_extract.sbatch"][1] == "--array=1"
        entries = {s["id"]: s for s in manifest(run)["stages"]}
        new_ext = entries["r1/extract"]["job_ids"][-1]
        gather_dep = entries["r1/gather"]["submissions"][-1]["dependency"]
        assert gather_dep == [new_ext, f"{ext}_0"]  # the new task and the old array's task still running
        assert entries["r1/consolidate"]["submissions"][-1]["dependency"] == [
            entries["r1/gather"]["job_ids"][-1], ids["r1/deploy"]]
        assert len(entries["r1/deploy"]["job_ids"]) == 1
        assert "still queued/running" in out.stdout
        # the secret reached the jobs' environment (as its hash) without being written anywhere
        wait_until(lambda: (calls / f"{ext}.call").exists() or list(calls.glob("*.call")), "a stub call", 60)
        digest = hashlib.sha256(SECRETS["WANDB_API_KEY"].encode()).hexdigest()
        call = next(calls.glob("*.call")).read_text().splitlines()
        assert call[-1] == digest and call[:2] == ["-m", "oel_hpc.worker"]
    finally:
        if run.joinpath("manifest.json").exists():
            cancel(all_job_ids(run))


def test_rendered_scripts_submitted_by_hand(tmp_path, stub):
    """launch.render_only=true, then the rendered submit.sh with plain sbatch: every job runs, in order."""
    stub_path, calls = stub
    root = tmp_path / "runs"
    env = {**os.environ, "OEL_STUB_DIR": str(calls), "OEL_STUB_SLEEP": "0"}
    out = oel(root, "wandb.mode=disabled", f"cluster.python={hydra_quoted(stub_path)}", "launch.render_only=true",
              env=env)
    assert out.returncode == 0, out.stderr
    run = root / "tiny-frozenlake"
    ids = {}
    sub = subprocess.run(["bash", str(run / "slurm" / "submit.sh")], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    ids = dict(line.split(": job ") for line in sub.stdout.splitlines() if ": job " in line)
    assert list(ids) == [f"r1/{s}" for s in STAGES]
    try:
        expected = [f"{ids['r1/extract']}_0", f"{ids['r1/extract']}_1", ids["r1/gather"], ids["r1/deploy"],
                    ids["r1/consolidate"], f"{ids['r1/evaluate']}_0", f"{ids['r1/evaluate']}_2"]
        rows = wait_until(lambda: (lambda r: r if set(expected) <= set(r) and all(
            r[i]["State"] in FINAL for i in expected) else None)(sacct(list(ids.values()))), "hand-submitted jobs", 180)
        assert {rows[i]["State"] for i in expected} == {"COMPLETED"}, rows
        assert rows[ids["r1/consolidate"]]["Start"] >= rows[ids["r1/gather"]]["End"]
        # each job ran the worker command for its own stage (the stub recorded it)
        got = {p.stem: p.read_text().splitlines()[:4] for p in calls.glob("*.call")}
        assert got[ids["r1/gather"]] == ["-m", "oel_hpc.worker", str(run), "r1/gather"]
        assert (run / "logs").is_dir() and any((run / "logs").iterdir())
    finally:
        cancel(list(ids.values()))


def test_hostile_paths_survive_sbatch(tmp_path, stub):
    """A run root with blanks, quotes, '#' and $(...) reaches the job intact, in sbatch's directives and the shell."""
    stub_path, calls = stub
    root = tmp_path / "runs a'b \"c\" #d $(touch PWNED)"
    env = {**os.environ, "OEL_STUB_DIR": str(calls), "OEL_STUB_SLEEP": "0"}
    out = oel(root, "wandb.mode=disabled", f"cluster.python={hydra_quoted(stub_path)}", "launch.check_python=false",
              "run.name=hostile", env=env)
    assert out.returncode == 0, out.stderr
    run = root / "hostile"
    ids = all_job_ids(run)
    try:
        gather = next(s for s in manifest(run)["stages"] if s["id"] == "r1/gather")["job_ids"][-1]
        wait_until(lambda: (calls / f"{gather}.call").exists(), "the gather job to run", 120)
        assert (calls / f"{gather}.call").read_text().splitlines()[:4] == ["-m", "oel_hpc.worker", str(run),
                                                                          "r1/gather"]
        assert queue_info([gather]) == [[gather, "oel:hostile:r1:gather", f"oel_hpc run={run} stage=r1/gather"]]
        assert list((run / "logs").glob(f"r1_gather_{gather}.out"))
        assert not list(tmp_path.rglob("PWNED")) and not list(ROOT.glob("PWNED"))
    finally:
        cancel(ids)


def _trainer_is_distributed() -> bool:
    if os.environ.get("OEL_TEST_TWO_RANKS") == "1":
        return True
    return any("SLURM_PROCID" in p.read_text() for p in (ROOT / "oel_hpc" / "train").glob("*.py"))


@pytest.mark.skipif(not _trainer_is_distributed(), reason="the distributed trainer (SLURM_PROCID) is not in yet")
def test_two_rank_consolidation_matches_one_rank(e2e, tmp_path):
    """The preset's consolidation (1 node x 2 tasks, 2 gloo ranks) on the finished run's round-1 inputs gives the
    same weights as the shared run's 1-rank consolidation."""
    import torch
    from safetensors.torch import load_file

    root = tmp_path / "runs"
    run = root / "tiny-frozenlake"
    shutil.copytree(e2e["run"], run, ignore=shutil.ignore_patterns("logs", "slurm", "manifest.json"))
    shutil.rmtree(run / "round_1" / "consolidate")
    shutil.rmtree(run / "round_1" / "eval")
    shutil.rmtree(run / "round_2")
    out = oel(root, "wandb.mode=disabled", "pipeline.rounds=1", env=e2e["env"])  # the preset: 2 tasks
    assert out.returncode == 0, out.stderr
    assert "r1/consolidate" in out.stdout and "r1/extract" not in out.stdout
    try:
        wait_for_run(run)
    finally:
        cancel(all_job_ids(run))
    a = load_file(run / "round_1/consolidate/hf/model.safetensors")
    b = load_file(e2e["run"] / "round_1/consolidate/hf/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
