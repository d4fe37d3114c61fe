"""A real local sweep (`python -m oel_hpc -m ... consolidate.lr=a,b`, no Slurm): the committed tiny model, a small
run per point, the points one after another, each in its own run directory. consolidate.lr changes only what
consolidation makes: the points' extraction outputs are the same bytes, their consolidated weights differ."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from oel_hpc.launch.sweep import RECORD
from tests.conftest import ROOT

# every stage as small as it goes: one seed of one step, one consolidation step, two games per evaluation
SMALL = ["extract.seeds=1", "extract.steps=1", "extract.use_step=1", "extract.eval_games=1",
         "deploy.games_per_step=2", "consolidate.steps=1", "evaluate.games=2", "wandb.mode=disabled"]
LRS = ("1e-4", "0.3")
NAMES = ("lr-0.0001", "lr-0.3")  # Hydra writes 1e-4 as 0.0001


def oel(root, *args, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "oel_hpc", "-m", f"run.root={root}", "run.name=sw", *SMALL, *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-local")
    out = oel(root, f"consolidate.lr={','.join(LRS)}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root, out


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_each_point_is_its_own_finished_run(swept):
    root, out = swept
    assert sorted(p.name for p in (root / "sw").iterdir()) == sorted([*NAMES, RECORD])
    assert sorted(p.name for p in root.iterdir()) == ["sw"]  # no Hydra multirun folder beside it
    for name in NAMES:
        manifest = json.loads((root / "sw" / name / "manifest.json").read_text())
        assert manifest["run"] == f"sw/{name}"
        assert {s["state"] for s in manifest["stages"]} == {"done"}
        assert f"OEL run 'sw/{name}' — {root / 'sw' / name}" in out.stdout  # each point's summary
    assert out.stdout.index(f"point 1/2: {NAMES[0]}") < out.stdout.index(f"point 2/2: {NAMES[1]}")


def test_the_record_lists_both_points(swept):
    root, _ = swept
    record = json.loads((root / "sw" / RECORD).read_text())
    assert record["sweep"] == "sw"
    assert record["params"] == {"consolidate.lr": ["0.0001", "0.3"]}
    assert [(p["run"], p["run_dir"], p["params"]) for p in record["points"]] == [
        ("sw/lr-0.0001", "lr-0.0001", {"consolidate.lr": "0.0001"}), ("sw/lr-0.3", "lr-0.3", {"consolidate.lr": "0.3"})]
    for p in record["points"]:
        assert p["overrides"][-1] == f"run.name={p['run']}" and "run.name=sw" not in p["overrides"]
        assert (root / "sw" / p["run_dir"] / "manifest.json").is_file()


def test_the_swept_key_changes_only_what_it_touches(swept):
    root, _ = swept
    a, b = (root / "sw" / name / "round_1" for name in NAMES)
    for rel in ("extract/seed_0/experience_1.txt", "extract/seed_0/games.jsonl", "experience_list.json"):
        assert sha(a / rel) == sha(b / rel), rel
    weights = "consolidate/hf/model.safetensors"
    assert sha(a / weights) != sha(b / weights)


def test_a_rerun_does_nothing_and_keeps_the_record(swept):
    root, _ = swept
    record = root / "sw" / RECORD
    before = (record.read_bytes(), record.stat().st_mtime_ns)
    out = oel(root, f"consolidate.lr={','.join(LRS)}", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("Nothing to do: every stage of run 'sw/") == 2
    assert (record.read_bytes(), record.stat().st_mtime_ns) == before
