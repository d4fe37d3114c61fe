"""Mixed precision (train/precision.py): with bf16 compute the student's float32 master weights take the small
updates that pure bf16 training loses, on every backend; the non-finite gradient skip; the precision keys.

Every run below trains the committed tiny model (oel_hpc/assets/tiny-qwen3) for STEPS optimizer steps at lr 1e-6 on
the same fixed rows (random token ids, the teacher's prompt longer than the student's, as with an experience) through
the trainer backends' own interface (what train/consolidate.py calls), and exports the result with the backend's
own export. "Moved" = the share of weights whose exported value differs from the starting value (as stored in the
master dtype). A run that moves its weights the way the float32 run does must move nearly as many of them, by
nearly the same amounts; pure bf16 moves few (an update at lr 1e-6 is below half a bf16 ulp of most weights).

    python -m pytest -s tests/test_precision.py -k table     # prints the table of every configuration

Runs with several processes (DDP, FSDP2 at 2 gloo ranks) and megatron (the CPU shims of tests/megatron_support, and
its pretend-CUDA mode for the distributed optimizer) go through `python -c` subprocesses, as tests/test_distributed.py
and tests/test_megatron_*.py do.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, compose

TINY = ROOT / "oel_hpc" / "assets" / "tiny-qwen3"
SHIMS = ROOT / "tests" / "megatron_support"
STEPS, ROWS, LR = 4, 4, 1e-6
HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None
needs_megatron = pytest.mark.skipif(not HAVE_MEGATRON, reason="megatron-core is not installed")

MIXED = ["trainer.dtype=bfloat16"]  # master_dtype defaults to float32
PURE_BF16 = ["trainer.dtype=bfloat16", "trainer.master_dtype=bfloat16"]
MEGATRON = ["trainer=megatron", "trainer.attention=sdpa", "trainer.optimizer=adamw"]


# ------------------------------------------------------------------------------------------------ the worker
def _rows(step: int, vocab: int) -> list[tuple[list[int], list[int], int]]:
    """Fixed rows of one step: (student ids, teacher ids, response length); the teacher's prompt has 8 more
    tokens in front (where an experience would be)."""
    g = torch.Generator().manual_seed(1000 + step)
    rows = []
    for i in range(ROWS):
        prompt = torch.randint(3, vocab, (12 + 3 * i,), generator=g).tolist()
        extra = torch.randint(3, vocab, (8,), generator=g).tolist()
        response = torch.randint(3, vocab, (10 + i,), generator=g).tolist()
        rows.append((prompt + response, extra + prompt + response, len(response)))
    return rows


def train(overrides: list[str], out: str, rank: int = 0, world: int = 1, store: str | None = None,
          nan_at: tuple[int, ...] = (), fake_cuda: bool = False) -> dict:
    """STEPS steps of the configured backend on the fixed rows (rank `rank` of `world`: every world-th row), then
    the backend's export into out/hf. `nan_at`: steps whose gradient gets a NaN written into one element (a hook on
    the student's first parameter). Returns {"norms", "stepped"} per step (rank 0 writes it to out/steps.json)."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from oel_hpc.train import distributed
    from oel_hpc.train.consolidate import build_trainer

    torch.set_num_threads(1)
    cfg = compose(["trainer.device=cpu", f"consolidate.lr={LR}", *overrides])
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    d = distributed.Dist(distributed.DistEnv(rank, world, rank), torch.device("cpu"), "gloo" if world > 1 else None)
    if fake_cuda:  # megatron's distributed optimizer on the CPU: tests/megatron_support/fake_cuda.py
        import fake_cuda

        fake_cuda.install()
        fake_cuda.resolve_as_on_gpu()
    trainer = build_trainer(cfg, TINY, d)
    first = next(p for p in trainer.student.parameters() if p.requires_grad)
    poison = {"on": False}

    def hook(grad):
        if not poison["on"]:
            return grad
        grad = grad.clone()
        grad.view(-1)[0] = float("nan")
        return grad

    first.register_hook(hook)
    loss_args = dict(k=256, temperature=0.7, renormalize=False, chunk_size=1024, impl="chunked")
    norms, stepped, unchanged = [], [], []
    for step in range(1, STEPS + 1):
        before = _snapshot(trainer.checkpoint_state()) if step in nan_at else None
        rows = _rows(step, trainer.vocab_size)
        mine = rows[trainer.dp_rank::trainer.dp_size]
        tokens = sum(n for _, _, n in rows)
        lens = [n for _, _, n in mine]
        h_teacher = trainer.teacher_hidden([t for _, t, _ in mine], lens, 0)
        poison["on"] = step in nan_at
        with trainer.accumulate(last=True):
            loss, *_ = trainer.student_loss([s for s, _, _ in mine], lens, 0, h_teacher, trainer.normalizer(tokens),
                                            loss_args)
            loss.backward()
        norm, took = trainer.optimizer_step(1.0)
        norms.append(norm)
        stepped.append(took)
        if before is not None:  # weights, master weights and optimizer state: what a checkpoint would hold
            after = _snapshot(trainer.checkpoint_state())
            unchanged.append(before.keys() == after.keys() and all(_same(before[k], after[k]) for k in before))
    trainer.export(AutoTokenizer.from_pretrained(TINY), Path(out) / "hf")
    result = {"norms": norms, "stepped": stepped, "unchanged": unchanged, "describe": trainer.describe()}
    if rank == 0:
        (Path(out) / "steps.json").write_text(json.dumps(result))
    return result


def _snapshot(state, prefix="") -> dict:
    """A nested checkpoint state flattened to {path: a copy of each value} (local shards of sharded tensors)."""
    out = {}
    if isinstance(state, dict):
        for k, v in state.items():
            out.update(_snapshot(v, f"{prefix}/{k}"))
    elif isinstance(state, (list, tuple)):
        for i, v in enumerate(state):
            out.update(_snapshot(v, f"{prefix}/{i}"))
    elif torch.is_tensor(state):
        local = state.to_local() if hasattr(state, "to_local") else state
        out[prefix] = local.detach().clone()
    else:
        out[prefix] = state
    return out


def _same(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    return a == b


def _env(megatron: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    if megatron:
        env.update(PYTHONPATH=str(SHIMS), OEL_MEGATRON_CPU_SHIMS="1")
    return env


def run_ranks(codes: list[str], megatron: bool) -> list[str]:
    """One `python -c code` per rank, side by side; their outputs, after every one exited 0."""
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=_env(megatron), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for code in codes]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=600)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outs)
    return outs


def train_in_subprocesses(overrides: list[str], out: Path, world: int = 1, megatron: bool = False,
                          **kw) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    outs = run_ranks([f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_precision import train; "
                      f"train({overrides!r}, {str(out)!r}, {rank}, {world}, {str(out / 'store')!r}, **{kw!r})"
                      for rank in range(world)], megatron)
    result = json.loads((out / "steps.json").read_text())
    result["log"] = "\n".join(outs)
    return result


# ------------------------------------------------------------------------------------------------ measures
def _start() -> dict:
    return load_file(TINY / "model.safetensors")


def measure(hf: Path, reference: dict | None) -> dict:
    """Share of weights moved from the start (as stored in the run's dtype); against the float32 run's weights
    (`reference`): the largest difference, and the relative error of the update (‖Δ − Δ_fp32‖ / ‖Δ_fp32‖: 1 when
    every update is lost)."""
    w = load_file(hf / "model.safetensors")
    start = _start()
    assert w.keys() == start.keys()
    moved = sum(int((w[k] != start[k].to(w[k].dtype)).sum()) for k in w)
    total = sum(v.numel() for v in w.values())
    out = {"moved": moved / total, "dtype": str(next(iter(w.values())).dtype).replace("torch.", "")}
    if reference is not None:
        out["max_diff"] = max((w[k].float() - reference[k].float()).abs().max().item() for k in w)
        # the run's own update: from its start as stored in its dtype (pure bf16 starts from rounded weights)
        delta = torch.cat([(w[k].float() - start[k].to(w[k].dtype).float()).flatten() for k in w])
        ref_delta = torch.cat([(reference[k].float() - start[k].float()).flatten() for k in w])
        out["update_error"] = ((delta - ref_delta).norm() / ref_delta.norm()).item()
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (result of train, hf folder)}, made on first use."""
    root = tmp_path_factory.mktemp("precision")
    made = {}

    def get(name: str):
        if name not in made:
            spec = CONFIGS[name]
            out = root / name.replace(" ", "_").replace("/", "_")
            if spec.get("subprocess"):
                res = train_in_subprocesses(spec["overrides"], out, spec.get("world", 1), spec.get("megatron", False),
                                            fake_cuda=spec.get("fake_cuda", False))
            else:
                res = train(spec["overrides"], str(out))
            made[name] = (res, out / "hf")
        return made[name]

    return get


CONFIGS = {
    "torch fp32": dict(overrides=[]),
    "torch bf16 compute, fp32 master": dict(overrides=MIXED),
    "torch pure bf16": dict(overrides=PURE_BF16),
    "torch DDP x2 bf16 compute, fp32 master": dict(overrides=MIXED + ["trainer.parallel=ddp"], subprocess=True,
                                                   world=2),
    "torch FSDP2 x2 bf16 compute, fp32 master": dict(overrides=MIXED + ["trainer.parallel=fsdp"], subprocess=True,
                                                     world=2),
    "megatron adamw fp32": dict(overrides=MEGATRON, subprocess=True, megatron=True),
    "megatron adamw bf16 compute, fp32 master": dict(overrides=MEGATRON + MIXED, subprocess=True, megatron=True),
    "megatron adamw pure bf16": dict(overrides=MEGATRON + PURE_BF16, subprocess=True, megatron=True),
    "megatron distributed bf16 compute, fp32 master": dict(
        overrides=["trainer=megatron", "trainer.attention=sdpa", "trainer.optimizer=distributed", *MIXED],
        subprocess=True, megatron=True, fake_cuda=True),
}


def _fp32_reference(runs) -> dict:
    return load_file(runs("torch fp32")[1] / "model.safetensors")


def _assert_like_fp32(runs, name: str) -> dict:
    """The run moves (nearly) the weights the float32 run moves, by (nearly) the same amounts, and exports float32
    master weights."""
    res, hf = runs(name)
    fp32 = measure(runs("torch fp32")[1], None)
    m = measure(hf, _fp32_reference(runs))
    assert all(res["stepped"]), res
    assert m["dtype"] == "float32", m
    assert m["moved"] >= 0.9 * fp32["moved"], (m, fp32)  # measured: 99.98 % of 99.98 %
    assert m["update_error"] <= 0.25, m  # measured: 0.06 (bf16 rounding of activations and gradients)
    # Adam moves a weight by about lr per step, whatever the gradient's size: bf16 noise can at most flip them
    assert m["max_diff"] <= 2 * STEPS * LR, m
    return m


def _assert_loses_updates(runs, name: str) -> dict:
    res, hf = runs(name)
    fp32 = measure(runs("torch fp32")[1], None)
    m = measure(hf, _fp32_reference(runs))
    assert m["dtype"] == "bfloat16", m
    assert m["moved"] <= 0.1 * fp32["moved"], (m, fp32)  # measured: 1.2 % of the weights
    return m


def test_torch_fp32_master_keeps_the_updates_bf16_loses_them(runs, capsys):
    m = _assert_like_fp32(runs, "torch bf16 compute, fp32 master")
    assert runs("torch bf16 compute, fp32 master")[0]["describe"] == "1 process, bfloat16 compute, float32 master weights"
    capsys.readouterr()
    _assert_loses_updates(runs, "torch pure bf16")
    assert "WARNING: trainer.master_dtype=bfloat16" in capsys.readouterr().err  # said once, at the start
    assert measure(runs("torch pure bf16")[1], _fp32_reference(runs))["update_error"] > 0.9  # measured 0.99


@pytest.mark.parametrize("parallel", ["DDP", "FSDP2"])
def test_torch_two_ranks_keep_fp32_master_weights(runs, parallel):
    name = f"torch {parallel} x2 bf16 compute, fp32 master"
    _assert_like_fp32(runs, name)
    assert "2 ranks" in runs(name)[0]["describe"] and "float32 master weights" in runs(name)[0]["describe"]


@needs_megatron
def test_megatron_adamw_keeps_fp32_master_weights(runs):
    _assert_like_fp32(runs, "megatron adamw bf16 compute, fp32 master")
    res, _ = runs("megatron adamw pure bf16")
    _assert_loses_updates(runs, "megatron adamw pure bf16")
    assert "WARNING: trainer.master_dtype=bfloat16" in res["log"]


@needs_megatron
def test_megatron_distributed_optimizer_means_the_same(runs):
    """megatron's distributed optimizer (pretend-CUDA on the CPU): the same scheme as MasterAdamW (bf16 model,
    float32 main weights and gradient accumulation), so the same weights up to summation order."""
    m = _assert_like_fp32(runs, "megatron distributed bf16 compute, fp32 master")
    a = load_file(runs("megatron adamw bf16 compute, fp32 master")[1] / "model.safetensors")
    b = load_file(runs("megatron distributed bf16 compute, fp32 master")[1] / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-7, m


def test_table(runs):
    """The figures for the record (python -m pytest -s tests/test_precision.py -k table)."""
    names = [n for n in CONFIGS if HAVE_MEGATRON or not n.startswith("megatron")]
    ref = _fp32_reference(runs)
    lines = [f"{STEPS} steps at lr {LR:g} on the tiny model ({ROWS} rows per step); moved = share of weights changed; "
             "max |w - w_fp32| and the update's relative error (1 = every update lost) against the torch fp32 run",
             f"{'configuration':<50} {'export':>9} {'moved':>8} {'max |w - w_fp32|':>17} {'update error':>13}"]
    for name in names:
        m = measure(runs(name)[1], ref)
        lines.append(f"{name:<50} {m['dtype']:>9} {m['moved']:>8.2%} {m['max_diff']:>17.2e} "
                     f"{m['update_error']:>13.3f}")
    print("\n" + "\n".join(lines))


# ------------------------------------------------------------------------------- non-finite gradient norm
@pytest.mark.parametrize("overrides", [[], MIXED], ids=["fp32", "bf16-compute"])
def test_torch_skips_a_step_with_a_nan_gradient(tmp_path, overrides):
    """A NaN written into one gradient element at step 2: that update is skipped (weights, masters and AdamW state
    bit for bit as before it), the others are taken, and the run ends with finite weights."""
    res = train(overrides, str(tmp_path), nan_at=(2,))
    assert res["stepped"] == [True, False, True, True]
    assert math.isnan(res["norms"][1]) and all(math.isfinite(n) for i, n in enumerate(res["norms"]) if i != 1)
    assert res["unchanged"] == [True]
    w = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())


@needs_megatron
@pytest.mark.parametrize("name", ["megatron adamw fp32", "megatron adamw bf16 compute, fp32 master",
                                  "megatron distributed bf16 compute, fp32 master"])
def test_megatron_skips_a_step_with_a_nan_gradient(tmp_path, name):
    spec = CONFIGS[name]
    res = train_in_subprocesses(spec["overrides"], tmp_path, 1, True, nan_at=(1, 3),
                                fake_cuda=spec.get("fake_cuda", False))
    assert res["stepped"] == [False, True, False, True]
    assert math.isnan(res["norms"][0]) and math.isnan(res["norms"][2])
    assert res["unchanged"] == [True, True]
    w = load_file(tmp_path / "hf" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in w.values())


def test_a_state_made_before_any_step_is_a_fresh_one():
    """A checkpoint written before the first real update (every step so far skipped) needs optimizer state to
    save; making it must not move the weights or advance Adam's step count: the next update is then exactly a
    fresh optimizer's. Both ways the state is made: torch's get_state_dict (torch backend, megatron adamw) and
    megatron/optimizer.ensure_state (distributed optimizer shards, MasterAdamW)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from oel_hpc.train.megatron.optimizer import ensure_state
    from oel_hpc.train.precision import fresh_adam_steps

    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        return model, torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)

    def update(model, opt):
        model(torch.ones(2, 4)).square().sum().backward()
        opt.step()
        return [p.detach().clone() for p in model.parameters()]

    fresh = update(*model_and_optimizer())
    for make in ("get_state_dict", "ensure_state"):
        model, opt = model_and_optimizer()
        start = [p.detach().clone() for p in model.parameters()]
        if make == "get_state_dict":
            get_state_dict(model, opt)
            fresh_adam_steps(opt)  # what the trainers do after it
        else:
            ensure_state([opt])
        assert all(torch.equal(a, b) for a, b in zip(start, model.parameters())), make
        assert all(float(opt.state[p]["step"]) == 0 for p in model.parameters()), make
        assert all(torch.equal(a, b) for a, b in zip(fresh, update(model, opt))), make


# The consolidation loop (train/consolidate.py) on a real run: the skipped step is logged and counted; a run whose
# every step is skipped fails instead of exporting its starting weights. The NaN is written into one gradient just
# before the optimizer step of the listed steps (a patch in the worker process).
_POISONED_WORKER = """
import runpy, sys
from oel_hpc.train.torch.trainer import TorchTrainer
bad, calls, step = set([{bad}]), [0], TorchTrainer.optimizer_step
def poisoned(self, grad_clip, skip=False):
    calls[0] += 1
    if calls[0] in bad:
        next(p for p in self.student.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
    return step(self, grad_clip, skip)
TorchTrainer.optimizer_step = poisoned
sys.argv = ["oel_hpc.worker", {run!r}, "r1/consolidate"]
runpy.run_module("oel_hpc.worker", run_name="__main__", alter_sys=True)
"""


def _reconsolidate(run: Path, dst: Path, bad: set[int], trainer: dict | None = None,
                   megatron: bool = False) -> subprocess.CompletedProcess:
    """Redo the consolidation of a copy of `run` (with `trainer` keys changed in its config), NaN gradients at the
    optimizer steps in `bad` (torch backend)."""
    import shutil

    from omegaconf import OmegaConf

    if not dst.exists():
        shutil.copytree(run, dst)
        shutil.rmtree(dst / "round_1" / "consolidate")
        cfg = OmegaConf.load(dst / "config.yaml")
        for key, value in (trainer or {}).items():
            cfg.trainer[key] = value
        OmegaConf.save(cfg, dst / "config.yaml")
    code = _POISONED_WORKER.format(bad=",".join(map(str, bad)), run=str(dst))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(megatron), capture_output=True, text=True,
                          timeout=600)


def test_consolidation_logs_and_counts_a_skipped_step(small_run, tmp_path):
    out = _reconsolidate(small_run, tmp_path / "run", {1})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "r1 step 1: gradient norm is nan, update skipped" in out.stderr
    c = tmp_path / "run" / "round_1" / "consolidate"
    rows = [json.loads(line) for line in (c / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [True, False]
    assert math.isnan(rows[0]["grad_norm"]) and math.isfinite(rows[1]["grad_norm"])
    assert (c / "DONE").is_file() and (c / "ckpt" / "step_1" / "meta.json").is_file()


def test_consolidation_fails_when_every_step_is_skipped(small_run, tmp_path):
    out = _reconsolidate(small_run, tmp_path / "run", {1, 2})
    assert out.returncode == 1, out.stderr[-3000:]  # a failure, said in one line (an OelError, not a crash)
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("oel_hpc.worker: error: r1 consolidate: all 2 steps had "
                                                          "a non-finite loss or gradient norm and were skipped")
    c = tmp_path / "run" / "round_1" / "consolidate"
    assert not (c / "DONE").exists() and not (c / "hf").exists()
    rows = [json.loads(line) for line in (c / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [True, True]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "megatron"])
def test_mixed_precision_checkpoint_resumes_exactly(small_run, tmp_path, backend):
    """bf16 compute: the checkpoint holds the float32 master weights and optimizer state (megatron adamw: beside
    the bf16 model), so a run cut after step 1 resumes to the uninterrupted run's weights, bit for bit."""
    import shutil

    if backend == "megatron" and not HAVE_MEGATRON:
        pytest.skip("megatron-core is not installed")
    trainer = {"dtype": "bfloat16"} | ({"name": "megatron", "attention": "sdpa", "optimizer": "adamw"}
                                       if backend == "megatron" else {})
    full = tmp_path / "full"
    out = _reconsolidate(small_run, full, set(), trainer, megatron=backend == "megatron")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    c = full / "round_1" / "consolidate"
    meta = json.loads((c / "ckpt" / "step_1" / "meta.json").read_text())
    assert (meta["trainer"], meta["dtype"], meta["master_dtype"]) == (backend, "bfloat16", "float32")
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "round_1" / "consolidate" / "ckpt" / "step_2")
    shutil.rmtree(cut / "round_1" / "consolidate" / "hf")
    (cut / "round_1" / "consolidate" / "DONE").unlink()
    out = _reconsolidate(small_run, cut, set(), megatron=backend == "megatron")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resumed from checkpoint step 1" in out.stderr and "bfloat16 compute, float32 master weights" in out.stderr
    a = load_file(c / "hf" / "model.safetensors")
    b = load_file(cut / "round_1" / "consolidate" / "hf" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in a.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ the keys
@pytest.mark.parametrize("overrides,key,message", [
    (["trainer.master_dtype=float64"], "trainer.master_dtype", "must be float32, bfloat16 or float16, got 'float64'"),
    (["trainer.export_dtype=int8"], "trainer.export_dtype", "must be null, float32, bfloat16 or float16"),
    (["trainer.dtype=bfloat16", "trainer.master_dtype=float16"], "trainer.master_dtype",
     "must be float32 .* or trainer.dtype itself"),
    (["trainer.master_dtype=bfloat16"], "trainer.master_dtype", "must be float32"),  # compute float32, master bf16
    (["trainer.dtype=double"], "trainer.dtype", "must be float32, bfloat16 or float16, got 'double'"),
])
def test_config_refuses_a_precision_that_cannot_run(overrides, key, message):
    from oel_hpc.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message) as e:
        validate(compose(overrides), check_files=False)
    assert e.value.key == key


@needs_megatron
def test_config_refuses_pure_16bit_with_the_distributed_optimizer():
    from oel_hpc.config import ConfigError, validate

    cfg = compose(["trainer=megatron", "trainer.optimizer=distributed", "trainer.dtype=bfloat16",
                   "trainer.master_dtype=bfloat16"])
    with pytest.raises(ConfigError, match="always keeps float32 master weights") as e:
        validate(cfg, check_files=False)
    assert e.value.key == "trainer.master_dtype"
    validate(compose(["trainer=megatron", "trainer.dtype=bfloat16", "trainer.master_dtype=bfloat16"]),
             check_files=False)  # auto: adamw


def test_defaults_and_recipes():
    from oel_hpc.config import validate
    from oel_hpc.train.precision import Precision

    for overrides in ([], ["trainer=megatron"]):
        t = compose(overrides).trainer
        assert (t.dtype, t.master_dtype, t.export_dtype) == ("float32", "float32", None)
    for recipe in ("frozenlake_qwen3_1_7b", "frozenlake_qwen3_4b", "frozenlake_qwen3_8b", "sokoban_qwen3_4b_instruct"):
        cfg = compose([f"experiment={recipe}"])
        validate(cfg, check_files=False)
        p = Precision.from_config(cfg.trainer)  # the paper: bf16 compute, fp32 master weights and export
        assert (p.compute, p.master, p.export, p.mixed) == (torch.bfloat16, torch.float32, torch.float32, True)
    assert Precision.from_config(compose(["trainer.dtype=bfloat16", "trainer.export_dtype=bfloat16"]).trainer
                                 ).export == torch.bfloat16


@pytest.mark.parametrize("override", ["trainer.master_dtype=bfloat16", "trainer.export_dtype=bfloat16"])
def test_the_keys_are_in_the_consolidation_hash(override):
    """A change redoes consolidation (and what reads its export), not the stages before it."""
    from oel_hpc.pipeline import build_dag

    base = {n.id: n.hash for n in build_dag(compose(["trainer.dtype=bfloat16"]))}
    changed = {n.id: n.hash for n in build_dag(compose(["trainer.dtype=bfloat16", override]))}
    assert [i for i in base if base[i] != changed[i]] == ["r1/consolidate", "r1/evaluate"]


def test_checkpoint_of_another_precision_is_refused(tmp_path):
    from oel_hpc.train.precision import Precision

    mixed = Precision(torch.bfloat16, torch.float32, torch.float32)
    mixed.check_meta({"dtype": "bfloat16", "master_dtype": "float32"}, tmp_path)
    mixed.check_meta({}, tmp_path)  # written before the keys existed: the config hash decides
    with pytest.raises(RuntimeError, match=r"trainer.master_dtype=bfloat16, this job has trainer.master_dtype="
                                           r"float32: resume with trainer.master_dtype=bfloat16"):
        mixed.check_meta({"dtype": "bfloat16", "master_dtype": "bfloat16"}, tmp_path)
    with pytest.raises(RuntimeError, match=r"trainer.dtype=float32, this job has trainer.dtype=bfloat16"):
        mixed.check_meta({"dtype": "float32", "master_dtype": "float32"}, tmp_path)
