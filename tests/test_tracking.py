"""Every task's progress record (progress.jsonl) and its wandb run, on a real tiny run (the committed tiny model)
with the real wandb package offline (no network here). The offline runs are read back from wandb's transaction log
(the `.wandb` file each offline run folder holds: wandb's record format, parsed with wandb's own protobuf
definitions; wandb 0.31 ships no Python reader of it, and its public API needs a server)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oel_hpc.pipeline import build_dag, clear_outputs
from oel_hpc.progress import TaskRecord
from oel_hpc.rundir import RunPaths, read_json, read_jsonl
from oel_hpc.stages.common import StageContext
from tests.conftest import ROOT, compose

KEY = "0123456789abcdef0123456789abcdef7ac4e2b9"  # a key in the jobs' environment: never a reason to go online
RUN = "tiny-frozenlake"


def oel(root, home):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "WANDB_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_API_KEY=KEY,
               **{v: str(home / v.lower()) for v in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR")})
    out = subprocess.run([sys.executable, "-m", "oel_hpc", f"run.root={root}", "wandb.mode=offline"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    oel(root, root)
    return root, root / RUN


# --------------------------------------------------------------------------------------------------------------
# wandb's transaction log: a 7-byte header, then records cut into 32 KiB blocks, each piece behind a 7-byte header
# (crc32, length, type: 1 full, 2 first, 3 middle, 4 last), the record a protobuf `Record`


def wandb_records(path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1), path
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def wandb_runs(run_dir):
    """Every offline run under the run directory: its folder, id, group, job type, name, logged rows, exit code."""
    runs = []
    for path in sorted(run_dir.rglob("offline-run-*/run-*.wandb")):
        found = {"folder": path.parent, "history": [], "steps": [], "exit": None}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                found.update(id=record.run.run_id, group=record.run.run_group, job_type=record.run.job_type,
                             name=record.run.display_name, project=record.run.project)
            elif kind == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                found["history"].append({k: v for k, v in items.items() if not k.startswith("_")})
                found["steps"].append(items["_step"])
            elif kind == "exit":
                found["exit"] = record.exit.exit_code
        runs.append(found)
    return runs


def tasks(run_dir):
    """(round, stage, task) of every task, from the manifest."""
    manifest = read_json(run_dir / "manifest.json")
    return [(s["round"], s["stage"], t) for s in manifest["stages"] for t in (s["tasks"] or [None])]


# --------------------------------------------------------------------------------------------------------------


def test_one_offline_wandb_run_per_task_grouped_named_and_logging_its_rows(run):
    root, run_dir = run
    paths = RunPaths(run_dir)
    runs = wandb_runs(run_dir)
    names = {"extract": "r{r}/extract/seed_{t}", "evaluate": "r{r}/eval/step_{t}"}
    expected = {names.get(stage, "r{r}/" + stage).format(r=r, t=t): (r, stage, t) for r, stage, t in tasks(run_dir)}
    assert sorted(w["name"] for w in runs) == sorted(expected) and len(expected) == 7
    assert len({w["id"] for w in runs}) == len(runs)
    for w in runs:
        r, stage, task = expected[w["name"]]
        assert (w["group"], w["job_type"], w["project"], w["exit"]) == (RUN, stage, "oel_hpc", 0), w
        # in the task's own folder, named by its id
        assert w["folder"].parent == paths.progress(r, stage, task).parent / "wandb", w["folder"]
        assert w["folder"].name.endswith(w["id"])
        progress = read_jsonl(paths.progress(r, stage, task))
        assert [h[f"{stage}/done"] for h in w["history"]] == [p["done"] for p in progress]
        for logged, row in zip(w["history"], progress):
            numbers = {f"{stage}/{k}": v for k, v in row.items() if k not in ("done", "total", "unit", "t")
                       and isinstance(v, (int, float))}
            assert numbers and {k: logged[k] for k in numbers} == numbers
    for p in run_dir.rglob("*"):  # the key in the environment is written nowhere
        assert not p.is_file() or KEY.encode() not in p.read_bytes(), p


def test_the_documented_upload_command_finds_every_tasks_run(run):
    """docs/wandb.md's `wandb sync` line, as a user types it (a shell expands its globs), with --dry-run: no server."""
    root, run_dir = run
    docs = (ROOT / "docs/wandb.md").read_text()
    [command] = [line for line in docs.splitlines() if line.startswith("wandb sync runs/<name>/")]
    home = root / "sync-home"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}, "WANDB_CONFIG_DIR": str(home),
           "WANDB_BASE_URL": "http://127.0.0.1:9", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", command.replace("wandb sync", "wandb sync --dry-run", 1)
                          .replace("runs/<name>", str(run_dir))], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    listed = sorted(line.split()[-1] for line in (out.stdout + out.stderr).splitlines() if line.endswith(".wandb"))
    assert listed == sorted(str(p) for p in run_dir.rglob("offline-run-*/run-*.wandb")) and len(listed) == 7


def check_rows(rows, total, unit):
    assert [r["done"] for r in rows] == list(range(1, total + 1))
    assert all(r["total"] == total and r["unit"] == unit for r in rows)
    assert [r["t"] for r in rows] == sorted(r["t"] for r in rows) and rows[0]["t"] > time.time() - 3600


def test_progress_rows_match_the_stages_own_records(run):
    from tokenizers import Tokenizer  # the model's own tokenizer file, without transformers' import time

    _, run_dir = run
    paths, cfg = RunPaths(run_dir), compose([])
    tokenizer = Tokenizer.from_file(str(Path(cfg.model.path) / "tokenizer.json"))
    steps = cfg.extract.steps
    entries = read_json(paths.experience_list(1))
    for seed in range(cfg.extract.seeds):
        rows = read_jsonl(paths.progress(1, "extract", seed))
        check_rows(rows, steps, "step")
        games = read_jsonl(paths.seed_dir(1, seed) / "games.jsonl")
        scores = {s["step"]: s["pass_rate"] for s in read_jsonl(paths.seed_dir(1, seed) / "scores.jsonl")}
        for row, game in zip(rows, games):
            text = paths.experience(1, seed, row["done"]).read_text()
            assert row["experience_tokens"] == len(tokenizer.encode(text, add_special_tokens=False).ids)
            assert (row["experience_items"] == 0) == (not text.strip())
            assert row["success"] == game["success"] and row["heldout_pass_rate"] == scores[row["done"]]
        [entry] = [e for e in entries if e["seed"] == seed]
        assert rows[entry["step"] - 1]["experience_tokens"] == entry["tokens"]

    rows = read_jsonl(paths.progress(1, "gather"))
    check_rows(rows, len(entries), "step")
    assert [(r["seed"], r["experience_tokens"]) for r in rows] == [(e["seed"], e["tokens"]) for e in entries]

    rows = read_jsonl(paths.progress(1, "deploy"))
    check_rows(rows, cfg.deploy.steps, "step")
    for row in rows:
        games = {g["game_seed"]: g["success"] for g in read_jsonl(paths.deploy_step(1, row["done"]))}
        assert (row["games"], row["pass_rate"]) == (len(games), sum(games.values()) / len(games))

    rows = read_jsonl(paths.progress(1, "consolidate"))
    check_rows(rows, cfg.consolidate.steps, "step")
    metrics = read_jsonl(paths.metrics(1))
    assert [{"step": r["done"], **{k: v for k, v in r.items() if k not in ("done", "total", "unit", "t")}}
            for r in rows] == metrics

    for step in (0, cfg.consolidate.steps):
        [row] = read_jsonl(paths.progress(1, "evaluate", step))
        check_rows([row], 1, "checkpoint")
        result = read_json(paths.eval_result(1, step))
        assert (row["checkpoint"], row["pass_rate"], row["games"]) == (step, result["pass_rate"], result["games"])
        assert row.get("teacher_pass_rate") == result.get("teacher", {}).get("pass_rate")

    for done in run_dir.rglob("DONE*"):  # a record, never an output
        if done.is_file() and not done.name.endswith(".started"):
            assert not [p for p in read_json(done)["outputs"] if "progress" in p], done


def test_wandb_settings_change_no_stage_hash():
    hashes = [{n.id: n.hash for n in build_dag(compose(overrides))} for overrides in (
        ["wandb.mode=disabled"], ["wandb.mode=online", "wandb.project=other", "wandb.init_timeout_s=5"], [])]
    assert hashes[0] == hashes[1] == hashes[2]


def test_record_fresh_start_resume_and_other_ranks(tmp_path):
    path = tmp_path / "progress.jsonl"
    with TaskRecord(path, 3, "step") as record:
        for k in (1, 2, 3):
            record.step(k, kl=k / 10)
    assert [r["kl"] for r in read_jsonl(path)] == [0.1, 0.2, 0.3]
    first = read_jsonl(path)
    TaskRecord(path, 3, "step", keep_upto=1)  # resumed after unit 1: its row stays as it was
    assert read_jsonl(path) == first[:1]
    TaskRecord(path, 3, "step", enabled=False).step(2, kl=9)  # another rank: writes nothing
    assert read_jsonl(path) == first[:1]
    TaskRecord(path, 3, "step")  # a fresh start: the earlier attempt's rows are gone at once
    assert path.read_text() == ""
    path.write_text('{"done": 1, "total": 3, "unit": "step", "t": 1.0}\n{"done": 2, "tot')  # cut mid-row
    assert TaskRecord(path, 3, "step", keep_upto=2).rows == []  # started afresh, with a warning
    with pytest.raises(ValueError, match="unit"):
        TaskRecord(path, 3, "steps")


def test_wandb_disabled_writes_the_record_and_no_wandb_folder(tmp_path):
    cfg = compose([f"run.root={tmp_path}", "wandb.mode=disabled"])
    paths = RunPaths(tmp_path / RUN)
    ctx = StageContext(cfg, paths, {n.id: n.hash for n in build_dag(cfg)})
    with ctx.record(1, "extract", 0, total=2) as record:
        assert record.wandb is not None and record.wandb.run is None
        record.step(1, experience_items=1)
    assert [r["experience_items"] for r in read_jsonl(paths.progress(1, "extract", 0))] == [1]
    assert not list(tmp_path.rglob("wandb"))


def test_only_rank_0_records_and_logs(tmp_path, monkeypatch):
    cfg = compose([f"run.root={tmp_path}", "wandb.mode=offline"])
    paths = RunPaths(tmp_path / RUN)
    ctx = StageContext(cfg, paths, {n.id: n.hash for n in build_dag(cfg)})
    monkeypatch.setenv("RANK", "1")  # as torchrun sets it for the second rank
    monkeypatch.setenv("WORLD_SIZE", "2")
    with ctx.record(1, "consolidate", None, total=2) as record:
        assert record.wandb is None
        record.step(1, kl=0.5)
    assert not list(tmp_path.rglob("*.jsonl")) and not list(tmp_path.rglob("wandb"))


def test_redoing_an_evaluation_clears_its_record(tmp_path):
    cfg = compose([f"run.root={tmp_path}"])
    paths = RunPaths(tmp_path / RUN)
    [evaluate] = [n for n in build_dag(cfg) if n.id == "r1/evaluate"]
    for step in (0, 2):
        TaskRecord(paths.progress(1, "evaluate", step), 1, "checkpoint").step(1, pass_rate=0.5)
    clear_outputs(paths, evaluate, 2)
    assert paths.progress(1, "evaluate", 0).is_file() and not paths.progress(1, "evaluate", 2).exists()


# --------------------------------------------------------------------------------------------------------------
# Last: these change the run in place (a wandb id belongs to its run directory)


def test_a_resumed_task_continues_its_wandb_run_and_keeps_its_rows(run):
    root, run_dir = run
    paths = RunPaths(run_dir)
    before = {w["name"]: w for w in wandb_runs(run_dir)}
    consolidate = paths.consolidate_dir(1)
    kept = read_jsonl(paths.progress(1, "consolidate"))[0]
    # the consolidation died after its step-1 checkpoint; the last evaluation was requeued after a stale attempt
    for p in (consolidate / "DONE", consolidate / "ckpt/step_2", consolidate / "hf"):
        subprocess.run(["rm", "-rf", str(p)], check=True)
    (consolidate / "ckpt/latest").write_text("1\n")
    paths.done(1, "evaluate", 2).unlink()
    paths.eval_result(1, 2).unlink()
    stale = {"done": 5, "total": 9, "unit": "checkpoint", "t": 1.0}
    paths.progress(1, "evaluate", 2).write_text(json.dumps(stale) + "\n")

    out = oel(root, root)
    assert "resumed from checkpoint step 1" in out.stderr
    rows = read_jsonl(paths.progress(1, "consolidate"))
    assert rows[0] == kept and [r["done"] for r in rows] == [1, 2] and rows[1]["t"] > kept["t"]
    assert [r["done"] for r in rows] == [m["step"] for m in read_jsonl(paths.metrics(1))]
    [row] = read_jsonl(paths.progress(1, "evaluate", 2))
    assert row["done"] == 1 and row["pass_rate"] == read_json(paths.eval_result(1, 2))["pass_rate"]

    after = wandb_runs(run_dir)
    for name, logged in (("r1/consolidate", [2]), ("r1/eval/step_2", [1])):
        again = [w for w in after if w["name"] == name]
        assert len(again) == 2 and {w["id"] for w in again} == {before[name]["id"]}, again
        new = next(w for w in again if w["folder"] != before[name]["folder"])
        assert [h[f"{new['job_type']}/done"] for h in new["history"]] == logged and new["exit"] == 0
        # wandb's step goes on from the attempt before: uploaded after it into one wandb run, no row is dropped
        assert min(new["steps"]) > max(before[name]["steps"]), (before[name]["steps"], new["steps"])
    assert len(after) == len(before) + 2  # nothing else ran
