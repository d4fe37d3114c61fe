"""Finite numbers during training and at export (issue 12): a non-finite loss or gradient norm never reaches the
weights (skipped, counted, the same decision on every rank), an update that makes the weights non-finite stops the
stage before anything is saved, too many skipped updates in a row stop it, and an export with a non-finite weight is
refused, naming the tensor.

The loop's step (train/consolidate.py `_train_step`) runs on the real backends (the committed tiny model) through a
worker, one process or two gloo ranks, as tests/test_precision.py drives them; the stage-level cases redo the
consolidation of a finished tiny run (tests/conftest.py `small_run`) with a patch in the worker process.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from oel_hpc.errors import NonFiniteWeights
from tests.conftest import ROOT, compose
from tests.test_precision import HAVE_MEGATRON, MEGATRON, MIXED, TINY, _env, _rows, _same, _snapshot, run_ranks

LOSS_ARGS = dict(k=256, temperature=0.7, renormalize=False, chunk_size=1024, impl="chunked")


# ------------------------------------------------------------------------------------------- the loop's step
def step_worker(overrides: list[str], out: str, rank: int = 0, world: int = 1, store: str | None = None,
                fake_cuda: bool = False) -> None:
    """Four steps of `_train_step` on the configured backend, then its export; rank r writes out/rank<r>.json:
      1. a normal step;
      2. the KL sum NaN on the LAST rank only (the loss's gradient untouched, so finite): skipped on every rank;
      3. the teacher's hidden states NaN: skipped;
      4. the learning rate at 1e308 (past what config validation lets through): NonFiniteWeights;
    then the backend's export of those weights, which must refuse them and write nothing."""
    import torch.distributed as dist
    from transformers import AutoTokenizer

    from oel_hpc.train import distributed
    from oel_hpc.train.consolidate import Sample, _train_step, build_trainer

    torch.set_num_threads(1)
    cfg = compose(["trainer.device=cpu", "consolidate.lr=1e-6", *overrides])
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    d = distributed.Dist(distributed.DistEnv(rank, world, rank), torch.device("cpu"), "gloo" if world > 1 else None)
    if fake_cuda:  # megatron's distributed optimizer on the CPU: tests/megatron_support/fake_cuda.py
        import fake_cuda

        fake_cuda.install()
        fake_cuda.resolve_as_on_gpu()
    trainer = build_trainer(cfg, TINY, d)
    run = SimpleNamespace(trainer=trainer, engine=SimpleNamespace(pad_token_id=0), cfg=cfg, d=d, r=1,
                          metrics=SimpleNamespace(close=lambda failed=False: None), loss_args=lambda: LOSS_ARGS)
    student_loss, teacher_hidden = trainer.student_loss, trainer.teacher_hidden
    result = {"reasons": [], "unchanged": [], "norms": []}
    for step in (1, 2, 3, 4):
        rows = _rows(step, trainer.vocab_size)
        mine = [Sample(s, t, n) for s, t, n in rows[trainer.dp_rank::trainer.dp_size]]
        tokens = sum(n for _, _, n in rows)
        if step == 2 and rank == world - 1:
            def nan_kl(*args, **kw):
                loss, kl, ent_s, ent_t = student_loss(*args, **kw)
                return loss, kl * float("nan"), ent_s, ent_t
            trainer.student_loss = nan_kl
        if step == 3:
            trainer.teacher_hidden = lambda *a, **kw: teacher_hidden(*a, **kw) * float("nan")
        if step == 4:
            for group in trainer.optimizer.param_groups:
                group["lr"] = 1e308
        before = _snapshot(trainer.checkpoint_state())
        try:
            _, norm, reason = _train_step(run, step, mine, tokens)
        except NonFiniteWeights as e:
            result["error"] = str(e)
            break
        finally:
            trainer.student_loss, trainer.teacher_hidden = student_loss, teacher_hidden
        after = _snapshot(trainer.checkpoint_state())
        result["reasons"].append(reason)
        result["norms"].append(norm)
        result["unchanged"].append(before.keys() == after.keys() and all(_same(before[k], after[k]) for k in before))
    try:
        trainer.export(AutoTokenizer.from_pretrained(TINY), Path(out) / "hf")
        result["export"] = "written"
    except NonFiniteWeights as e:
        result["export"] = str(e)
    result["left_in_out"] = sorted(p.name for p in Path(out).iterdir() if not p.name.startswith(("rank", "store")))
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))


def run_steps(overrides: list[str], out: Path, world: int = 1, megatron: bool = False,
              fake_cuda: bool = False) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    run_ranks([f"import sys; sys.path.insert(0, {str(ROOT)!r}); from tests.test_train_numerics import step_worker; "
               f"step_worker({overrides!r}, {str(out)!r}, {rank}, {world}, {str(out / 'store')!r}, {fake_cuda!r})"
               for rank in range(world)], megatron)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


BACKENDS = {
    "torch": dict(overrides=[]),
    "torch DDP x2": dict(overrides=["trainer.parallel=ddp"], world=2),
    "torch FSDP2 x2": dict(overrides=["trainer.parallel=fsdp"], world=2),
    "megatron adamw": dict(overrides=MEGATRON, megatron=True),
    "megatron distributed bf16": dict(overrides=["trainer=megatron", "trainer.attention=sdpa",
                                                 "trainer.optimizer=distributed", *MIXED],
                                      megatron=True, fake_cuda=True),
}
SLOW = ("torch FSDP2 x2", "megatron distributed bf16")


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in BACKENDS])
def test_non_finite_numbers_never_reach_the_weights(tmp_path, name):
    spec = BACKENDS[name]
    if spec.get("megatron") and not HAVE_MEGATRON:
        pytest.skip("megatron-core is not installed")
    results = run_steps(spec["overrides"], tmp_path, spec.get("world", 1), spec.get("megatron", False),
                        spec.get("fake_cuda", False))
    for rank, res in enumerate(results):
        # the same decisions on every rank, though only the last rank's KL was NaN at step 2
        assert res["reasons"] == [None, "non-finite loss", "non-finite loss"], (rank, res)
        assert math.isfinite(res["norms"][1])  # step 2's gradient was finite: the loss alone made it skip
        assert res["unchanged"] == [False, True, True], (rank, res)  # weights, masters and optimizer state
        assert res["error"].startswith("r1 consolidate: the update of step 4 made the weights non-finite ("), res
        assert "the learning rate is likely too high" in res["error"]
    # rank 0 exports: refused, naming a tensor, nothing written (not even a temporary folder)
    assert results[0]["export"].startswith(f"refusing to export {tmp_path / 'hf'}: "), results[0]
    assert "values non-finite); nothing written" in results[0]["export"]
    assert results[0]["left_in_out"] == []


# ------------------------------------------------------------------------------------------------- the export
@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32), AutoTokenizer.from_pretrained(TINY)


def test_export_refuses_a_state_with_one_nan(tiny_model, tmp_path):
    from oel_hpc.train.checkpoint import export_hf

    model, tokenizer = tiny_model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.layers.1.mlp.down_proj.weight"].view(-1)[7] = float("nan")
    with pytest.raises(NonFiniteWeights, match=r"^refusing to export .*/hf: model\.layers\.1\.mlp\.down_proj\.weight "
                                               r"\(float32, 1 of \d+ values non-finite\); nothing written"):
        export_hf(model, tokenizer, tmp_path / "hf", state_dict=state)
    assert list(tmp_path.iterdir()) == []
    export_hf(model, tokenizer, tmp_path / "hf")  # the model's own (finite) weights export
    assert (tmp_path / "hf" / "model.safetensors").is_file()


def test_export_refuses_a_weight_beyond_the_export_dtype(tiny_model, tmp_path):
    """A finite float32 weight past float16's range is inf once exported in float16: refused, dtype named."""
    import copy

    from oel_hpc.train.checkpoint import export_hf

    model, tokenizer = tiny_model
    big = copy.deepcopy(model)
    with torch.no_grad():
        big.model.norm.weight[0] = 1e5
    with pytest.raises(NonFiniteWeights, match=r"model\.norm\.weight \(float16, 1 of \d+ values non-finite\)"):
        export_hf(big.to(torch.float16), tokenizer, tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


def test_all_finite_is_exact():
    """The cheap sum may overflow with finite terms: then the exact look decides."""
    from oel_hpc.train.numerics import all_finite, first_non_finite

    big = torch.full((4,), 3e38)  # finite, sums to inf in float32
    assert all_finite([big, torch.ones(3)]) and all_finite([torch.full((8,), 6e4, dtype=torch.float16)])
    assert not all_finite([torch.ones(3), torch.tensor([0.0, float("nan")])])
    assert not all_finite([torch.tensor([float("inf"), -float("inf")])])  # the sum is NaN, not a cancelled 0
    assert first_non_finite([("a", big), ("b", torch.tensor([1.0, float("-inf")]))]) == \
        "b (float32, 1 of 2 values non-finite)"
    assert first_non_finite([("a", big), ("i", torch.tensor([1, 2]))]) is None


# ------------------------------------------------------------------------------------------------- the stage
_WORKER = """
import runpy, sys
from oel_hpc.train.torch.trainer import TorchTrainer
bad, calls, step, init = set([{bad}]), [0], TorchTrainer.optimizer_step, TorchTrainer.__init__
def poisoned(self, grad_clip, skip=False):
    calls[0] += 1
    if calls[0] in bad:
        next(p for p in self.student.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
    return step(self, grad_clip, skip)
def huge_lr(self, *args, **kw):  # past config validation: the optimizer itself gets it
    init(self, *args, **kw)
    for group in self.optimizer.param_groups:
        group["lr"] = {lr!r}
TorchTrainer.optimizer_step = poisoned
if {lr!r} is not None:
    TorchTrainer.__init__ = huge_lr
sys.argv = ["oel_hpc.worker", {run!r}, "r1/consolidate"]
runpy.run_module("oel_hpc.worker", run_name="__main__", alter_sys=True)
"""


def reconsolidate(run: Path, dst: Path, bad: set[int] = frozenset(), lr: float | None = None,
                  **consolidate) -> subprocess.CompletedProcess:
    """Redo the consolidation of a copy of `run` (consolidate keys changed in its config): NaN gradients at the
    optimizer steps in `bad`, the optimizer's learning rate set to `lr`."""
    from omegaconf import OmegaConf

    shutil.copytree(run, dst)
    shutil.rmtree(dst / "round_1" / "consolidate")
    cfg = OmegaConf.load(dst / "config.yaml")
    cfg.consolidate.update(consolidate)
    OmegaConf.save(cfg, dst / "config.yaml")
    code = _WORKER.format(bad=",".join(map(str, bad)), run=str(dst), lr=lr)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(False), capture_output=True, text=True,
                          timeout=600)


def _rows_of(c: Path) -> list[dict]:
    return [json.loads(line) for line in (c / "metrics.jsonl").read_text().splitlines()]


def test_skipped_updates_in_a_row_stop_the_stage(small_run, tmp_path):
    """consolidate.max_skipped_in_a_row=1: step 1 trains, step 2 is skipped: the stage stops there, before step 2's
    checkpoint, with one line naming the steps and the metrics file; no DONE, no export."""
    out = reconsolidate(small_run, tmp_path / "run", {2}, max_skipped_in_a_row=1)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("oel_hpc.worker: error: r1 consolidate: the update of step 2 was skipped (non-finite "
                           "gradient norm; 1 in a row, consolidate.max_skipped_in_a_row=1; skip_reason in "), last
    assert "round_1/consolidate/metrics.jsonl); nothing is exported. Likely causes: " in last
    c = tmp_path / "run" / "round_1" / "consolidate"
    assert not (c / "DONE").exists() and not (c / "hf").exists()
    assert (c / "ckpt" / "step_1").is_dir() and not (c / "ckpt" / "step_2").exists()
    assert [(r["skipped"], r["skip_reason"]) for r in _rows_of(c)] == [(False, None),
                                                                       (True, "non-finite gradient norm")]


def test_an_update_that_makes_the_weights_non_finite_stops_before_saving(small_run, tmp_path):
    """A learning rate of 1e308 (refused by validation; set on the optimizer here): the first update overflows, the
    stage stops with one line, and neither a checkpoint nor an export holds the weights."""
    out = reconsolidate(small_run, tmp_path / "run", lr=1e308)
    assert out.returncode == 1, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("oel_hpc.worker: error: r1 consolidate: the update of step 1 made the weights non-finite "
                           "("), last
    assert "the learning rate is likely too high (consolidate.lr=" in last
    c = tmp_path / "run" / "round_1" / "consolidate"
    assert not (c / "DONE").exists() and not (c / "hf").exists() and not (c / "ckpt" / "step_1").exists()


@pytest.mark.parametrize("rows,expected", [
    ([], []),
    ([{"step": 1, "skipped": True}, {"step": 2, "skipped": True}], [1, 2]),
    ([{"step": 1, "skipped": True}, {"step": 2, "skipped": False}, {"step": 3, "skipped": True}], [3]),
    ([{"step": 1, "skipped": True}, {"step": 2, "skipped": False}], []),
    ([{"step": 1}], []),  # rows from before the key existed
])
def test_a_resumed_run_goes_on_counting(rows, expected):
    from oel_hpc.train.consolidate import skipped_at_end

    assert skipped_at_end(rows) == expected


def _counting_run(limit: int):
    paths = SimpleNamespace(metrics=lambda r: Path(f"/runs/x/round_{r}/consolidate/metrics.jsonl"),
                            display=lambda p: str(p))
    return SimpleNamespace(r=1, cfg=compose([f"consolidate.max_skipped_in_a_row={limit}"]), paths=paths,
                           metrics=SimpleNamespace(close=lambda failed=False: None), skipped_in_a_row=[])


def test_only_skips_in_a_row_count():
    from oel_hpc.errors import SkippedInARow
    from oel_hpc.train.consolidate import _stop_when_skipping

    run = _counting_run(3)
    for step, reason in enumerate(["non-finite loss", "non-finite loss", None, "non-finite loss",
                                   "non-finite gradient norm"], start=1):
        _stop_when_skipping(run, step, reason)  # never 3 in a row
    with pytest.raises(SkippedInARow, match=r"^r1 consolidate: the updates of steps 4-6 were skipped \(non-finite "
                                            r"loss; 3 in a row, consolidate.max_skipped_in_a_row=3; skip_reason in "
                                            r"/runs/x/round_1/consolidate/metrics.jsonl\); nothing is exported"):
        _stop_when_skipping(run, 6, "non-finite loss")
    never = _counting_run(0)
    for step in range(1, 20):
        _stop_when_skipping(never, step, "non-finite loss")
    assert never.skipped_in_a_row == list(range(1, 20))


def test_the_key_is_checked_and_hashed():
    from oel_hpc.config import ConfigError, validate
    from oel_hpc.pipeline import build_dag

    assert compose().consolidate.max_skipped_in_a_row == 3
    with pytest.raises(ConfigError, match=r"must be in \[0, 100000\]") as e:
        validate(compose(["consolidate.max_skipped_in_a_row=-1"]), check_files=False)
    assert e.value.key == "consolidate.max_skipped_in_a_row"
    base = {n.id: n.hash for n in build_dag(compose())}
    changed = {n.id: n.hash for n in build_dag(compose(["consolidate.max_skipped_in_a_row=0"]))}
    assert [i for i in base if base[i] != changed[i]] == ["r1/consolidate", "r1/evaluate"]
