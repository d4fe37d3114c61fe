"""A real chat model through every stage: experiment=smollm2_frozenlake, shrunk to a few minutes on 2 cores, with
SmolLM2-135M-Instruct as tools/convert_smollm2.py makes it. Skipped when the converted folder is absent ($OEL_CACHE;
.ci/run builds it). Marked `real_model`: `pytest -m "not real_model"` leaves it out.

Whether a 135M model writes any experience item in a few extraction steps depends on its samples; what must
never happen is an empty experience that trains anyway. So: if extraction yielded items, the round finishes; if
not, the run must stop before training with the cause named, and the round is then finished with a hand-written
experience (gather.source) — every stage still runs on the real model."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from oel_hpc.config import cache_dir
from oel_hpc.rundir import read_jsonl
from tests.conftest import ROOT

MODEL = cache_dir() / "smollm2-135m-instruct"
SMALL = ["extract.seeds=1", "extract.steps=2", "extract.use_step=2", "deploy.games_per_step=4",
         "consolidate.steps=1", "evaluate.games=4", "wandb.mode=disabled"]

pytestmark = [pytest.mark.real_model, pytest.mark.slow,
              pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(),
                                 reason=f"no converted SmolLM2 at {MODEL} (python tools/convert_smollm2.py)")]


def oel(root, *overrides):
    return subprocess.run([sys.executable, "-m", "oel_hpc", "experiment=smollm2_frozenlake", f"run.root={root}",
                           *SMALL, *overrides], cwd=ROOT, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "OMP_NUM_THREADS": str(len(os.sched_getaffinity(0)))})


def test_smollm2_round_through_every_stage(tmp_path):
    out = oel(tmp_path)
    run = tmp_path / "smollm2-frozenlake"
    games = read_jsonl(run / "round_1/extract/seed_0/games.jsonl")
    assert len(games) == 2 and all(g["extractor_response"].strip() for g in games)
    yielded = sum(bool(g["new_items"]) for g in games)
    if yielded == 0:
        assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
        assert "every experience" in out.stderr and "is empty" in out.stderr, out.stderr[-2000:]
        assert not (run / "round_1/consolidate/DONE").exists()
        (tmp_path / "lessons.txt").write_text("- Answer with one move in square brackets, for example [right].\n"
                                              "- H is a hole: never step on H. G is the goal.\n")
        (tmp_path / "experience_list.txt").write_text("lessons.txt\n")  # gather.source names experience files
        out = oel(tmp_path, f"gather.source={tmp_path / 'experience_list.txt'}", "run.overwrite=true")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    # every stage's records, from the real model
    deploy = read_jsonl(run / "round_1/deploy/step_1.jsonl")
    assert deploy and all(row["prompt_token_ids"] and row["policy"] for row in deploy)
    metrics = read_jsonl(run / "round_1/consolidate/metrics.jsonl")
    assert len(metrics) == 1 and metrics[0]["kl"] > 0 and metrics[0]["tokens"] > 0
    before = load_file(MODEL / "model.safetensors")
    after = load_file(run / "round_1/consolidate/hf/model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before), "consolidation did not change the weights"
    start, end = (json.loads((run / f"round_1/eval/step_{s}.json").read_text()) for s in (0, 1))
    assert start["games"] == end["games"] == start["teacher"]["games"] == 4
    for line in ("pass rate with experience", "valid moves before", "extraction steps with items",
                 "deploy valid moves"):
        assert line in out.stdout, out.stdout[-3000:]
