"""The embedded default run with engine=vllm for every stage (the CPU build of vLLM), next to the same run with the
HF engine: both finish with the full summary; greedy evaluation of the starting model gives the same results through
either engine; the sampled stages really went through another engine (other random streams, other experience); a
rerun does nothing. Real model (the committed tiny Qwen3), real files; nothing mocked."""
import json

import pytest

from oel_hpc.rundir import read_jsonl
from tests.test_e2e import oel

pytest.importorskip("vllm")

GREEDY_EVAL = ("evaluate.sampling.temperature=0", "engine.vllm.enforce_eager=true")


@pytest.mark.slow
def test_every_stage_through_vllm_matches_the_hf_run_where_it_must(tmp_path):
    runs = {}
    for engine in ("vllm", "hf"):
        root = tmp_path / engine
        out = oel(root, f"engine={engine}", *GREEDY_EVAL)
        assert "pass rate before (16 games)" in out.stdout and "consolidation KL, first step" in out.stdout
        runs[engine] = root / "tiny-frozenlake"
    vllm_run, hf_run = runs["vllm"], runs["hf"]
    config = (vllm_run / "config.yaml").read_text()
    assert "name: vllm" in config
    manifest = json.loads((vllm_run / "manifest.json").read_text())
    assert all(s["state"] == "done" for s in manifest["stages"])

    # greedy: the same games, the same answers, through either engine (the starting model, and with experience
    # in context only where both runs extracted the same experience)
    step0 = {e: json.loads((r / "round_1/eval/step_0.json").read_text()) for e, r in runs.items()}
    for result in step0.values():
        result.pop("model"), result.pop("teacher", None)
    assert step0["vllm"] == step0["hf"]

    # sampled: another random stream, so other responses somewhere in extraction or deployment
    def responses(run):
        games = [g for s in (0, 1) for g in read_jsonl(run / f"round_1/extract/seed_{s}/games.jsonl")]
        deploy = read_jsonl(run / "round_1/deploy/step_1.jsonl")
        return json.dumps(games, sort_keys=True), json.dumps(deploy, sort_keys=True)
    assert responses(vllm_run) != responses(hf_run)
    metrics = read_jsonl(vllm_run / "round_1/consolidate/metrics.jsonl")
    assert len(metrics) == 2 and all(m["tokens"] > 0 and m["rows"] > 0 for m in metrics)

    again = oel(tmp_path / "vllm", "engine=vllm", *GREEDY_EVAL)
    assert "Nothing to do" in again.stdout + again.stderr
