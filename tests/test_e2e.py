"""The embedded default end to end, through the user's command: run, rerun (no-op), changed config, resume after an
interrupted consolidation, and a second round that starts from the first round's export. Real model (the committed
tiny Qwen3), real files; nothing mocked."""
import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from oel_hpc.rundir import read_jsonl
from tests.conftest import ROOT


def oel(root, *overrides, check=True):
    out = subprocess.run([sys.executable, "-m", "oel_hpc", f"run.root={root}", "wandb.mode=offline", *overrides],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    if check:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = oel(root)
    return root, root / "tiny-frozenlake", out


def snapshot(run_dir):
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()
            and "wandb" not in p.parts}


def test_layout_and_records(first_run):
    _, run, out = first_run
    assert "pass rate before (16 games)" in out.stdout and "consolidation KL, first step" in out.stdout
    for rel in ["config.yaml", "manifest.json", "round_1/experience_list.json", "round_1/deploy/step_1.jsonl",
                "round_1/deploy/step_2.jsonl", "round_1/deploy/DONE", "round_1/consolidate/metrics.jsonl",
                "round_1/consolidate/ckpt/step_1/meta.json", "round_1/consolidate/ckpt/step_2/.metadata",
                "round_1/consolidate/ckpt/latest", "round_1/consolidate/hf/model.safetensors",
                "round_1/consolidate/hf/tokenizer.json", "round_1/consolidate/DONE", "round_1/eval/step_0.json",
                "round_1/eval/step_2.json"] + [f"round_1/extract/seed_{s}/{f}" for s in (0, 1) for f in (
                    "experience_1.txt", "experience_3.txt", "games.jsonl", "scores.jsonl", "DONE")]:
        assert (run / rel).is_file(), rel
    manifest = json.loads((run / "manifest.json").read_text())
    assert [s["id"] for s in manifest["stages"]] == ["r1/extract", "r1/gather", "r1/deploy", "r1/consolidate",
                                                     "r1/evaluate"]
    assert all(s["state"] == "done" and s["seconds"] >= 0 for s in manifest["stages"])
    done = json.loads((run / "round_1/consolidate/DONE").read_text())
    stage_hash = next(s["hash"] for s in manifest["stages"] if s["id"] == "r1/consolidate")
    assert done["config_hash"] == stage_hash and "round_1/consolidate/hf/model.safetensors" in done["outputs"]

    entries = json.loads((run / "round_1/experience_list.json").read_text())
    assert [(e["seed"], e["step"]) for e in entries] == [(0, 3), (1, 3)]
    assert all(not e["path"].startswith("/") for e in entries)  # relative: the run can move
    assert any(e["tokens"] > 0 for e in entries), "the tiny model should write experience"
    # evaluate.teacher: the starting model with the round's experience in context, on the same held-out games;
    # the tiny model was trained to play better with experience, which is what consolidation distils
    before = json.loads((run / "round_1/eval/step_0.json").read_text())
    teacher = before["teacher"]
    assert teacher["games"] == before["games"] == 16 and teacher["experiences"] == 2
    assert teacher["pass_rate"] > before["pass_rate"], (teacher, before)
    assert "teacher" not in json.loads((run / "round_1/eval/step_2.json").read_text())
    assert "pass rate with experience" in out.stdout and "extraction steps with items" in out.stdout
    rows = read_jsonl(run / "round_1/deploy/step_1.jsonl")
    assert {r["game_seed"] for r in rows}.__len__() == 8
    for key in ("game_seed", "turn", "messages", "prompt_token_ids", "policy", "success", "turns", "response"):
        assert key in rows[0]
    metrics = read_jsonl(run / "round_1/consolidate/metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2]
    for m in metrics:
        assert set(m) >= {"kl", "student_entropy", "teacher_entropy", "grad_norm", "tokens", "seconds"}
        assert m["tokens"] > 0 and m["grad_norm"] > 0
    assert metrics[0]["kl"] > 0, "experience in the teacher's prompt must make it differ from the student"
    for step in (0, 2):
        result = json.loads((run / f"round_1/eval/step_{step}.json").read_text())
        assert result["games"] == 16 and 0 <= result["pass_rate"] <= 1 and 1 <= result["mean_turns"] <= 5


def test_second_run_is_a_noop(first_run):
    root, run, _ = first_run
    before = snapshot(run)
    out = oel(root)
    assert "Nothing to do" in out.stdout
    assert snapshot(run) == before  # not a byte written, manifest and config included


def test_changed_config_is_an_error_unless_overwrite(first_run, tmp_path):
    root, run, _ = first_run
    copy = tmp_path / "tiny-frozenlake"
    shutil.copytree(run, copy)
    before = snapshot(copy)
    out = oel(tmp_path, "evaluate.games=8", check=False)
    assert out.returncode == 2
    assert "r1/evaluate (step 0) already finished with a different config" in out.stderr
    assert snapshot(copy) == before  # refused before writing anything
    extract_done = (copy / "round_1/extract/seed_0/DONE").stat().st_mtime_ns
    out = oel(tmp_path, "evaluate.games=8", "run.overwrite=true")
    assert json.loads((copy / "round_1/eval/step_2.json").read_text())["games"] == 8
    assert (copy / "round_1/extract/seed_0/DONE").stat().st_mtime_ns == extract_done  # upstream untouched


def test_interrupted_consolidation_resumes_to_the_same_weights(first_run, tmp_path):
    _, run, _ = first_run
    copy = tmp_path / "tiny-frozenlake"
    shutil.copytree(run, copy)
    consolidate = copy / "round_1/consolidate"
    # as if the job died after the step-1 checkpoint: no step-2 state, no export, no DONE
    for p in (consolidate / "DONE", consolidate / "ckpt/step_2", consolidate / "hf"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    (consolidate / "ckpt/latest").write_text("1\n")
    for p in (copy / "round_1/eval").glob("*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()  # eval/wandb: the evaluations' wandb runs
    out = oel(tmp_path)
    assert "resumed from checkpoint step 1" in out.stderr
    original = load_file(run / "round_1/consolidate/hf/model.safetensors")
    resumed = load_file(consolidate / "hf/model.safetensors")
    assert original.keys() == resumed.keys()
    for name in original:
        assert (original[name] - resumed[name]).abs().max().item() <= 1e-6, name
    assert [m["step"] for m in read_jsonl(consolidate / "metrics.jsonl")] == [1, 2]


def test_second_round_starts_from_the_first_rounds_export(first_run, tmp_path):
    _, run, _ = first_run
    copy = tmp_path / "tiny-frozenlake"
    shutil.copytree(run, copy)
    r1_done = (copy / "round_1/consolidate/DONE").stat().st_mtime_ns
    out = oel(tmp_path, "pipeline.rounds=2")
    assert (copy / "round_1/consolidate/DONE").stat().st_mtime_ns == r1_done
    assert "round 2" in out.stdout
    rows = read_jsonl(copy / "round_2/deploy/step_1.jsonl")
    assert {r["policy"] for r in rows} == {"round_1/consolidate/hf"}
    eval0 = json.loads((copy / "round_2/eval/step_0.json").read_text())
    assert eval0["model"] == "round_1/consolidate/hf"
    assert (copy / "round_2/consolidate/hf/model.safetensors").is_file()
    # round-2 extraction used other game seeds than round 1
    s1 = {g["game_seed"] for g in read_jsonl(copy / "round_1/extract/seed_0/games.jsonl")}
    s2 = {g["game_seed"] for g in read_jsonl(copy / "round_2/extract/seed_0/games.jsonl")}
    assert s1.isdisjoint(s2)


def test_consolidation_uses_the_configured_loss_impl(first_run, tmp_path):
    """consolidate.loss_impl reaches the loss: fused on this CPU machine stops consolidation with the loss's own
    error (never a silent switch to chunked); the rounds before it are kept."""
    _, run, _ = first_run
    copy = tmp_path / "tiny-frozenlake"
    shutil.copytree(run, copy)
    out = oel(tmp_path, "consolidate.loss_impl=fused", "run.overwrite=true", check=False)
    assert out.returncode != 0
    assert "loss impl 'fused' is the Triton GPU kernel and needs CUDA tensors" in out.stderr, out.stderr[-3000:]
    assert not (copy / "round_1/consolidate/DONE").exists()
    assert (copy / "round_1/deploy/DONE").is_file()


def test_all_empty_experience_stops_consolidation(random_model_dir, tmp_path):
    """A random-weight model writes no experience item: gather says so, consolidation refuses (its loss would be
    identically zero) until the user allows it explicitly."""
    out = oel(tmp_path, f"model.path={random_model_dir}", "extract.eval_games=0", check=False)
    assert out.returncode == 2
    assert "wrote an EMPTY experience_3" in out.stderr
    assert "every experience in" in out.stderr and "consolidate.allow_empty_experience=true" in out.stderr
    run = tmp_path / "tiny-frozenlake"
    assert not (run / "round_1/consolidate/DONE").exists()
    out = oel(tmp_path, f"model.path={random_model_dir}", "extract.eval_games=0",
              "consolidate.allow_empty_experience=true")
    assert "every experience is empty; training anyway" in out.stderr
    assert (run / "round_1/consolidate/DONE").is_file()
