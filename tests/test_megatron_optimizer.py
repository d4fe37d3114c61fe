"""trainer.optimizer of trainer=megatron (oel_hpc/train/megatron/optimizer.py): which optimizer auto picks, the config
errors, the loss normalizer, the meta.json refusals, the distributed optimizer's checkpoint shards through DCP, and
whole consolidations with megatron's distributed optimizer.

The distributed optimizer is UNTESTED ON A GPU until a GPU session runs tools/gpu_check.py (its
``megatron+distopt`` line; no session so far had a GPU). What runs here: megatron-core's own
DistributedDataParallel, DistributedOptimizer and finalize_model_grads, with gloo's reduce-scatter and all-gather,
on the CPU under the test-only pretend-CUDA mode of tests/megatron_support/fake_cuda.py (megatron refuses tensors
whose type() is not named torch.cuda.*, and creates its scalars with device='cuda'), with trainer.optimizer resolved
as on a GPU. Measured on the committed tiny model, 3 steps, fp32: at tp=2 x dp=2 its weights are the adamw path's
to 7e-8 (grad norms and KL to 1e-6), a cut run resumes bit for bit (bf16 too, whose fp32 master weights live only
in the optimizer shards), another dp or another optimizer is refused, and the checkpoint exports for evaluation.
What only a GPU can show — NCCL, CUDA streams, TransformerEngine's FusedAdam (step counted per group), speed and
memory — is not covered."""
import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from safetensors.torch import load_file

from oel_hpc.config import ConfigError, validate
from oel_hpc.train.megatron.optimizer import ensure_state, load_shard_state, loss_normalizer, resolve, shard_state
from oel_hpc.rundir import read_jsonl
from tests.conftest import ROOT, compose
from tests.test_distributed import clean_env, cut, finish, weights
from tests.test_megatron_trainer import torch_run as base  # the same reference run: trainer=torch, one process

HAVE_MEGATRON = importlib.util.find_spec("megatron") is not None
needs_megatron = pytest.mark.skipif(not HAVE_MEGATRON, reason="megatron-core is not installed "
                                                              "(pip install 'oel_hpc[megatron]')")
STEPS = 3
CONSOLIDATE = "round_1/consolidate"
SUPPORT = ROOT / "tests" / "megatron_support"


# --------------------------------------------------------------------------------------------- pure logic
def test_auto_is_distributed_on_cuda_and_adamw_elsewhere():
    assert resolve("auto", "cpu", "float32") == resolve("auto", "cpu", "bfloat16") == "adamw"
    assert resolve("auto", "cuda", "float32") == resolve("auto", torch.device("cuda", 3), torch.bfloat16) \
        == "distributed"
    assert resolve("auto", "cuda", "float16") == "adamw"  # the distributed optimizer would need a loss scaler
    # it always keeps float32 master weights: pure bf16 training is adamw's
    assert resolve("auto", "cuda", "bfloat16", "float32") == "distributed"
    assert resolve("auto", "cuda", "bfloat16", "bfloat16") == "adamw"
    with pytest.raises(ValueError, match=r"trainer.master_dtype: megatron's distributed optimizer always keeps "
                                         r"float32 master weights"):
        resolve("distributed", "cuda", "bfloat16", torch.bfloat16)
    assert resolve("adamw", "cuda", "bfloat16") == "adamw"
    assert resolve("distributed", "cuda", "float32") == "distributed"
    with pytest.raises(ValueError, match=r"trainer.optimizer: distributed .* needs CUDA.* runs on cpu"):
        resolve("distributed", "cpu", "float32")
    with pytest.raises(ValueError, match=r"trainer.optimizer: distributed supports float32 and bfloat16"):
        resolve("distributed", "cuda", "float16")
    with pytest.raises(ValueError, match=r"trainer.optimizer: must be auto, adamw or distributed, got 'sgd'"):
        resolve("sgd", "cuda", "float32")


def test_loss_normalizer_matches_how_gradients_meet_over_dp():
    """adamw sums the dp gradients: divide by all tokens; megatron's DDP averages them: by tokens / dp."""
    assert loss_normalizer(1200, 4, "adamw") == 1200
    assert loss_normalizer(1200, 4, "distributed") == 300
    assert loss_normalizer(1000, 3, "distributed") == pytest.approx(1000 / 3)


@pytest.mark.parametrize("overrides,message", [
    (["trainer=megatron", "trainer.optimizer=distributed", "trainer.device=cpu"], "needs CUDA, but trainer.device=cpu"),
    (["trainer=megatron", "trainer.optimizer=lamb"], "must be auto, adamw or distributed, got 'lamb'"),
    (["trainer=megatron", "trainer.optimizer=distributed", "trainer.dtype=float16"], "not float16"),
    (["trainer.optimizer=distributed"], "needs trainer=megatron"),
    (["trainer.optimizer=lamb"], "must be auto, adamw or distributed"),
])
def test_config_refuses_what_cannot_run(overrides, message):
    with pytest.raises(ConfigError, match=message) as e:
        validate(compose(overrides), check_files=False)
    assert e.value.key == "trainer.optimizer"


@needs_megatron  # validate_trainer checks that megatron-core imports
def test_config_accepts_the_optimizers():
    assert compose(["trainer=megatron"]).trainer.optimizer == "auto"
    for overrides in (["trainer.optimizer=adamw", "trainer.device=cpu"], ["trainer.optimizer=distributed"],
                      ["trainer.optimizer=distributed", "trainer.device=cuda", "trainer.dtype=bfloat16"]):
        validate(compose(["trainer=megatron", *overrides]), check_files=False)
    validate(compose(["trainer.optimizer=adamw"]), check_files=False)  # trainer=torch: AdamW is what it runs


@needs_megatron
def test_meta_refuses_another_optimizer_or_dp(tmp_path):
    from oel_hpc.train.megatron.trainer import check_optimizer

    old = {"trainer": "megatron", "tp": 2}  # written before trainer.optimizer existed: AdamW state
    check_optimizer(old, tmp_path, "adamw", 4)
    with pytest.raises(RuntimeError, match=r"holds the state of trainer.optimizer=adamw, this job runs "
                                           r"trainer.optimizer=distributed"):
        check_optimizer(old, tmp_path, "distributed", 1)
    dist_meta = {**old, "optimizer": "distributed", "dp": 2}
    check_optimizer(dist_meta, tmp_path, "distributed", 2)
    with pytest.raises(RuntimeError, match=r"at 2 data-parallel ranks, this job has 4.*resume with 2 x trainer.tp"):
        check_optimizer(dist_meta, tmp_path, "distributed", 4)
    with pytest.raises(RuntimeError, match=r"trainer.optimizer=distributed, this job runs trainer.optimizer=adamw"):
        check_optimizer(dist_meta, tmp_path, "adamw", 2)


def _inner_optimizer(seed: int):
    """What megatron's DistributedOptimizer steps: a torch AdamW over flat fp32 shards, in two param groups."""
    g = torch.Generator().manual_seed(seed)
    shards = [torch.randn(n, generator=g) for n in (5, 3, 7)]
    return torch.optim.AdamW([{"params": shards[:2]}, {"params": shards[2:]}], lr=1e-2, weight_decay=0.1)


def _step(opt, seed: int):
    g = torch.Generator().manual_seed(seed)
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_optimizer_shards_round_trip_through_dcp(tmp_path):
    """shard_state -> DCP -> a fresh optimizer (ensure_state gives DCP its template) -> load_shard_state: the same
    master shards, Adam state and step counts (per parameter as torch's AdamW keeps them, and per group as
    TransformerEngine's FusedAdam does), so the next steps are the same."""
    a = _inner_optimizer(0)
    for s in range(3):
        _step(a, s)
    a.param_groups[1]["step"] = 3  # a per-group step count, as FusedAdam keeps it
    dcp.save({"opt": shard_state([a])}, checkpoint_id=tmp_path, no_dist=True)

    b = _inner_optimizer(7)  # other weights, no state yet
    b.param_groups[1]["step"] = 0
    ensure_state([b])
    template = {"opt": shard_state([b])}
    dcp.load(template, checkpoint_id=tmp_path, no_dist=True)
    load_shard_state([b], template["opt"])
    assert b.param_groups[1]["step"] == 3
    params = lambda opt: [p for group in opt.param_groups for p in group["params"]]  # noqa: E731
    for pa, pb in zip(params(a), params(b)):
        assert torch.equal(pa, pb)
        assert a.state[pa].keys() == b.state[pb].keys()
        assert all(torch.equal(a.state[pa][k], b.state[pb][k]) for k in a.state[pa])
    for s in (10, 11):
        _step(a, s)
        _step(b, s)
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.param_groups[0]["params"], b.param_groups[0]["params"]))


# ---------------------------------------------------------------------- consolidations (megatron, CPU)
def _env() -> dict:
    return clean_env(PYTHONPATH=str(SUPPORT), OEL_MEGATRON_CPU_SHIMS="1")


def _consolidate(run: Path, ranks: int, fake_cuda: bool, expect_ok: bool = True) -> str:
    """trainer=megatron consolidation of `run` on `ranks` processes; `fake_cuda`: under the pretend-CUDA mode,
    trainer.optimizer resolved as on a GPU."""
    entry = [str(SUPPORT / "fake_cuda.py")] if fake_cuda else ["-m", "oel_hpc.worker"]
    pre = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    proc = subprocess.Popen([sys.executable, *pre, *entry, str(run), "r1/consolidate"], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    codes, out = finish([proc], timeout=420)
    assert (codes == [0]) == expect_ok, out[-5000:]
    return out


def _as_megatron(src: Path, dst: Path, tp: int, optimizer: str, dtype: str = "float32") -> Path:
    shutil.copytree(src, dst)
    shutil.rmtree(dst / CONSOLIDATE)
    (dst / CONSOLIDATE).mkdir()
    cfg = OmegaConf.load(dst / "config.yaml")
    cfg.trainer.name, cfg.trainer.tp, cfg.trainer.attention = "megatron", tp, "sdpa"
    cfg.trainer.optimizer, cfg.trainer.dtype = optimizer, dtype
    OmegaConf.save(cfg, dst / "config.yaml")
    return dst


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def _meta(run: Path, step: int = 1) -> dict:
    """meta.json without its checksums (tests/test_checkpoint.py checks those)."""
    meta = json.loads((run / CONSOLIDATE / f"ckpt/step_{step}/meta.json").read_text())
    assert meta.pop("files") and meta.pop("meta_sha256")
    return meta


@pytest.fixture(scope="module")
def tp2_dp2(base, tmp_path_factory):
    """The same consolidation at tp=2 x dp=2 with adamw, and with trainer.optimizer=auto resolved as on a GPU:
    the distributed optimizer."""
    root = tmp_path_factory.mktemp("tp2dp2")
    adamw = _as_megatron(base, root / "adamw", 2, "adamw")
    _consolidate(adamw, 4, fake_cuda=False)
    distributed = _as_megatron(base, root / "distributed", 2, "auto")
    out = _consolidate(distributed, 4, fake_cuda=True)
    return adamw, distributed, out


@needs_megatron
@pytest.mark.slow
def test_distributed_optimizer_gives_the_adamw_weights(tp2_dp2):
    adamw, distributed, _ = tp2_dp2
    assert _max_diff(adamw, distributed) <= 1e-6  # measured 7e-8
    ma, md = read_jsonl(adamw / CONSOLIDATE / "metrics.jsonl"), read_jsonl(distributed / CONSOLIDATE / "metrics.jsonl")
    assert [m["step"] for m in md] == list(range(1, STEPS + 1))
    for x, y in zip(ma, md):
        assert (x["tokens"], x["rows"]) == (y["tokens"], y["rows"])
        for key in ("kl", "student_entropy", "teacher_entropy", "grad_norm"):  # grad_norm: megatron's own
            assert y[key] == pytest.approx(x[key], rel=1e-5), key
    precision = {"dtype": "float32", "master_dtype": "float32"}
    assert _meta(adamw) | {"config_hash": 0} == {"step": 1, "config_hash": 0, "world_size": 4, "trainer": "megatron",
                                                 "tp": 2, "optimizer": "adamw", "compute_threads": 1, **precision}
    assert _meta(distributed) | {"config_hash": 0} == {"step": 1, "config_hash": 0, "world_size": 4,
                                                       "trainer": "megatron", "tp": 2, "optimizer": "distributed",
                                                       "dp": 2, "compute_threads": 1, **precision}
    # the optimizer shards sit beside the model, one per (tp, dp) rank
    stored = dcp.FileSystemReader(str(distributed / CONSOLIDATE / "ckpt/step_1")).read_metadata().state_dict_metadata
    assert {k.split(".")[0] + "." + k.split(".")[2] for k in stored if ".dist_optimizer." in k} == {
        f"tp{t}_of_2.dp{d}_of_2" for t in range(2) for d in range(2)}


@needs_megatron
@pytest.mark.slow
def test_distributed_checkpoint_resumes_exactly_and_refuses_what_it_cannot_load(tp2_dp2, tmp_path):
    _, distributed, _ = tp2_dp2
    run = cut(distributed, tmp_path / "a", keep=1)
    out = _consolidate(run, 4, fake_cuda=True)
    assert "resumed from checkpoint step 1 on 4 ranks (megatron tp=2 x dp=2, distributed optimizer)" in out
    assert _max_diff(distributed, run) <= 1e-7  # measured 0
    # another dp: the shards follow the dp layout
    out = _consolidate(cut(distributed, tmp_path / "b", keep=1), 2, fake_cuda=True, expect_ok=False)
    assert "written by the distributed optimizer at 2 data-parallel ranks, this job has 1" in out
    # the same config (trainer.optimizer=auto) on a machine where it resolves to adamw (here: the plain CPU)
    out = _consolidate(cut(distributed, tmp_path / "c", keep=1), 4, fake_cuda=False, expect_ok=False)
    assert "holds the state of trainer.optimizer=distributed, this job runs trainer.optimizer=adamw" in out


@needs_megatron
def test_distributed_checkpoint_exports_for_evaluation(tp2_dp2):
    from oel_hpc.rundir import RunPaths
    from oel_hpc.train.export import export_for_eval

    _, distributed, _ = tp2_dp2
    out = export_for_eval(OmegaConf.load(distributed / "config.yaml"), RunPaths(distributed), 1, STEPS)
    a, b = weights(distributed), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@needs_megatron
@pytest.mark.slow
def test_bf16_master_weights_resume_from_the_optimizer_shards(base, tmp_path):
    """bf16 compute: the fp32 master weights exist only in the optimizer shards; a resumed run must continue from
    them, not from the bf16 model weights (tp=1 x dp=2), and the export is theirs (float32: trainer.export_dtype
    defaults to the master dtype), gathered over the dp ranks."""
    full = _as_megatron(base, tmp_path / "full", 1, "distributed", dtype="bfloat16")
    _consolidate(full, 2, fake_cuda=True)
    stored = dcp.FileSystemReader(str(full / CONSOLIDATE / "ckpt/step_1")).read_metadata().state_dict_metadata
    mains = [m for k, m in stored.items() if k.endswith(".main")]
    assert mains and all(m.properties.dtype == torch.float32 for m in mains)
    run = cut(full, tmp_path / "cut", keep=1)
    _consolidate(run, 2, fake_cuda=True)
    assert _max_diff(full, run) == 0.0
    exported = weights(run)
    assert all(v.dtype == torch.float32 for v in exported.values())
    # the master weights, not the bf16 model's rounding of them: most of them are not bf16 numbers
    assert sum(int((v != v.bfloat16().float()).sum()) for v in exported.values()) > 0.5 * sum(
        v.numel() for v in exported.values())
    assert (_meta(run)["dtype"], _meta(run)["master_dtype"]) == ("bfloat16", "float32")

