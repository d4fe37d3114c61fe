"""The vocabulary-parallel loss on real gloo process groups of 1, 2 and 3 ranks against the single-device loss on the
whole head. One launch starts every group at once (one world of 6 processes); each rank runs every case on its shards
of the same seeded weights and saves what it got; the tests compare in this process. V = 101 is divisible by neither 2 nor 3,
and some cases pad the vocabulary to a multiple of 8 per shard as megatron does, with garbage in the padding rows
(large, so a padding row that leaked into the softmax would show); V = 9 on 8-row shards leaves a shard with one
real row and, on 3 ranks, one with none. Tie cases use dyadic weights so that equal rows give bit-equal logits on
every rank: there the only right answer is the one the lowest-id rule gives, which loss.py's single-device paths
(production and reference) follow too."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from oel_hpc.train.loss import LossOutput, topk_lowest_id, topk_reverse_kl, topk_reverse_kl_reference
from oel_hpc.train.loss.common import _fp32
from oel_hpc.train.loss.vocab_parallel import vocab_parallel_topk_reverse_kl
from tests.conftest import ROOT

N, H, V = 37, 16, 101
WORLDS = (1, 2, 3)
UPSTREAM = 1.5  # d(objective)/d(loss): the gradient must scale with it


def _cases():
    cases = []
    for k in (1, 5, 40, V):
        for renorm in (False, True):
            for tau in (0.7, 1.3):
                cases.append(dict(kind="random", dtype="float64", k=k, renorm=renorm, tau=tau))
    for k, renorm, tau in ((5, False, 0.7), (V, True, 1.3), (1, True, 1.3), (40, False, 0.7)):
        cases.append(dict(kind="random", dtype="float32", k=k, renorm=renorm, tau=tau))
    cases += [
        dict(kind="random", dtype="float64", k=40, renorm=False, tau=0.7, pad=8),
        dict(kind="random", dtype="float64", k=V, renorm=True, tau=1.3, pad=8, chunk=1),
        dict(kind="random", dtype="float64", k=5, renorm=False, tau=0.7, chunk=64),  # one chunk
        dict(kind="random", dtype="float64", k=3, renorm=False, tau=0.7, V=9, pad=8),  # a shard of padding only
        dict(kind="random", dtype="float64", k=9, renorm=True, tau=1.3, V=9, pad=8),
        dict(kind="peaked", dtype="float64", k=5, renorm=False, tau=0.7),
        dict(kind="peaked", dtype="float64", k=40, renorm=True, tau=1.3),
        dict(kind="peaked", dtype="float32", k=40, renorm=False, tau=0.7),
        dict(kind="flat", dtype="float64", k=40, renorm=False, tau=0.7),
        dict(kind="flat", dtype="float64", k=V, renorm=True, tau=1.3),
        dict(kind="flat", dtype="float32", k=5, renorm=True, tau=0.7),
        # duplicate rows: top-k boundaries cut through groups of exactly equal logits spread over the shards
        dict(kind="ties", dtype="float64", k=5, renorm=False, tau=0.7),
        dict(kind="ties", dtype="float64", k=40, renorm=True, tau=1.3, pad=8),
        dict(kind="ties", dtype="float32", k=40, renorm=False, tau=0.7),
        dict(kind="ties_free", dtype="float64", k=1, renorm=False, tau=0.7),
        dict(kind="ties_free", dtype="float64", k=5, renorm=True, tau=1.3),
        dict(kind="ties_free", dtype="float32", k=40, renorm=False, tau=0.7, pad=8),
        # bf16: the dyadic dot products are exact in the fp32 accumulator, then rounded alike on every rank
        dict(kind="ties", dtype="bfloat16", k=40, renorm=False, tau=0.7),
        dict(kind="ties_free", dtype="bfloat16", k=5, renorm=True, tau=1.3, pad=8),
        dict(kind="ties_free", dtype="bfloat16", k=40, renorm=False, tau=0.7),
        dict(kind="uniform", dtype="float64", k=5, renorm=False, tau=0.7),  # every logit of a position equal
        dict(kind="uniform", dtype="float64", k=40, renorm=True, tau=1.3),
        dict(kind="random", dtype="bfloat16", k=40, renorm=False, tau=0.7),  # softmax math upcast to fp32
    ]
    for i, c in enumerate(cases):
        c.setdefault("V", V)
        c.setdefault("pad", 1)
        c.setdefault("chunk", 8)
        c["normalizer"] = None if i % 2 else 53.5
        c["seed"] = 1000 + i
    return cases


CASES = _cases()


def _shard_rows(c, tp):
    return math.ceil(c["V"] / (tp * c["pad"])) * c["pad"]


def _problem(c, tp):
    """Full weights (hs, W [V, H], ht, Wt) and padding rows for the head padded to Vs·tp rows; all but the padding
    are independent of tp."""
    g = torch.Generator().manual_seed(c["seed"])
    Vc, kind = c["V"], c["kind"]
    dyadic = lambda *s: torch.randint(-4, 5, s, generator=g, dtype=torch.float64) / 4  # exact dot products
    if kind in ("ties", "ties_free", "uniform"):
        distinct = 1 if kind == "uniform" else 6
        rows = dyadic(distinct, H)
        pattern = torch.randint(0, distinct, (Vc,), generator=g)
        hs, W = dyadic(N, H), rows[pattern]
        # "ties": the teacher's logits are a function of the student's (−z/2), so equal student logits — also of
        # distinct rows, frequent with small dyadic entries — have equal teacher logits and any tie choice gives
        # the same loss; otherwise the teacher is unrelated and only the lowest-id choice is right
        ht, Wt = (hs, -W / 2) if kind == "ties" else (dyadic(N, H), dyadic(Vc, H))
    else:
        scale = {"random": 0.7, "peaked": 0.7 * 30, "flat": 1e-3}[kind]
        hs, W = torch.randn(N, H, generator=g, dtype=torch.float64) * scale, torch.randn(Vc, H, generator=g,
                                                                                           dtype=torch.float64) * 0.7
        ht, Wt = (torch.randn(N, H, generator=g, dtype=torch.float64) * 0.7,
                  torch.randn(Vc, H, generator=g, dtype=torch.float64) * 0.7)
    pad = _shard_rows(c, tp) * tp - Vc
    gp = torch.Generator().manual_seed(7 + tp)
    garbage = lambda: torch.randn(pad, H, generator=gp, dtype=torch.float64) * 50
    dt = getattr(torch, c["dtype"])
    return [x.to(dt) for x in (hs, W, ht, Wt, torch.cat([W, garbage()]), torch.cat([Wt, garbage()]))]


def _run_case(c, tp, rank, group):
    """This rank's result for case c: (loss, kl_sum, entropies, grad of hs, grad of its student head shard)."""
    from oel_hpc.train.loss.vocab_parallel import _VocabParallelTopKReverseKL

    hs, _, ht, _, Wp, Wtp = _problem(c, tp)
    Vs = _shard_rows(c, tp)
    hs.requires_grad_()
    Ws = Wp[rank * Vs:(rank + 1) * Vs].clone().requires_grad_()
    Wt = Wtp[rank * Vs:(rank + 1) * Vs].clone()
    kw = dict(k=c["k"], temperature=c["tau"], renormalize=c["renorm"], chunk_size=c["chunk"],
              normalizer=c["normalizer"])
    if tp == 1:  # the public function hands a group of one to loss.py: run the sharded code itself
        loss, kl, es, et = _VocabParallelTopKReverseKL.apply(hs, Ws, ht, Wt, c["k"], c["tau"], c["renorm"],
                                                             c["chunk"], c["normalizer"] or N, True, True,
                                                             c["V"], group, 1, 0)
        out = LossOutput(loss, kl, N, es / N, et / N)
    else:
        out = vocab_parallel_topk_reverse_kl(hs, Ws, ht, Wt, vocab_size=c["V"], group=group, **kw)
    (out.loss * UPSTREAM).backward()
    return dict(loss=out.loss.detach(), kl_sum=out.kl_sum, tokens=out.tokens, student_entropy=out.student_entropy,
                teacher_entropy=out.teacher_entropy, grad_h=hs.grad, grad_W=Ws.grad)


# one world of 6 processes holds all three groups; their members interleave, so a process's rank in its group is
# not its global rank (as for a tensor-parallel group inside data parallelism)
GROUPS = {1: [0], 2: [1, 3], 3: [2, 4, 5]}


def _worker(global_rank: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=global_rank,
                            world_size=sum(map(len, GROUPS.values())))
    try:
        groups = {tp: dist.new_group(members) for tp, members in GROUPS.items()}  # every process creates each
        tp = next(tp for tp, members in GROUPS.items() if global_rank in members)
        rank = GROUPS[tp].index(global_rank)
        assert dist.get_rank(groups[tp]) == rank
        torch.save([_run_case(c, tp, rank, groups[tp]) for c in CASES], f"{out_dir}/w{tp}r{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{tp: [per rank: [per case: result]]} from one launch of every group."""
    tmp = tmp_path_factory.mktemp("vocab_parallel")
    procs = []
    for global_rank in range(sum(map(len, GROUPS.values()))):
        code = (f"from tests.test_loss_vocab_parallel import _worker; "
                f"_worker({global_rank}, {str(tmp / 'store')!r}, {str(tmp)!r})")
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    bad = {r: outs[r][-3000:] if r < len(outs) else "" for r, p in enumerate(procs) if p.returncode != 0}
    assert not bad, bad
    return {tp: [torch.load(tmp / f"w{tp}r{r}.pt") for r in range(tp)] for tp in WORLDS}


def _selected_lowest_id(z, k):
    # reference rule: the k largest, ties towards the lower id (a stable sort keeps the lower id first)
    return torch.sort(z, dim=-1, descending=True, stable=True).indices[..., :k]


def _reference(c, hs, W, ht, Wt, rule):
    """Single-device (loss, kl_sum, entropies, grads) on the whole head: `production` = loss.py's topk_reverse_kl,
    `plain` = topk_reverse_kl_reference on full logits, `lowest_id` = the same math with the lowest-id tie rule."""
    hs, W = hs.clone().requires_grad_(), W.clone().requires_grad_()
    norm = c["normalizer"] or N
    if rule == "production":
        out = topk_reverse_kl(hs, W, ht, Wt, k=c["k"], temperature=c["tau"], renormalize=c["renorm"],
                              chunk_size=c["chunk"], normalizer=c["normalizer"])
        loss, kl, es, et = out.loss, out.kl_sum, out.student_entropy, out.teacher_entropy
    else:
        z, zt = _fp32(hs @ W.t()) / c["tau"], _fp32(ht @ Wt.t()) / c["tau"]
        lp, lq = F.log_softmax(z, -1), F.log_softmax(zt, -1)
        es, et = [-(x.exp() * x).sum(-1).mean().detach() for x in (lp, lq)]
        if rule == "plain":
            kl = topk_reverse_kl_reference((hs @ W.t())[None], (ht @ Wt.t())[None], torch.ones(1, N, dtype=bool),
                                           k=c["k"], temperature=c["tau"], renormalize=c["renorm"]) * N
        else:  # lowest_id, or its mirror image highest_id (a negative control)
            ids = (_selected_lowest_id(z.detach(), c["k"]) if rule == "lowest_id"
                   else z.size(-1) - 1 - _selected_lowest_id(z.detach().flip(-1), c["k"]))
            a, b = lp.gather(-1, ids), lq.gather(-1, ids)
            if c["renorm"]:
                a, b = a - a.logsumexp(-1, keepdim=True), b - b.logsumexp(-1, keepdim=True)
            kl = (a.exp() * (a - b)).sum()
        loss = kl / norm
    (loss * UPSTREAM).backward()
    return dict(loss=loss.detach(), kl_sum=kl.detach(), student_entropy=es, teacher_entropy=et, grad_h=hs.grad,
                grad_W=W.grad)


def _tol(c):
    if c["dtype"] == "float64":
        return dict(rtol=1e-10, atol=1e-10)
    if c["dtype"] == "bfloat16":
        return dict(rtol=1e-2, atol=1e-2)
    # logits up to ~100: fp32 rounding of z alone is ~1e-5 absolute, and the two single-device fp32 paths
    # (topk_reverse_kl, topk_reverse_kl_reference) differ by 1.6e-4 on head gradients of size 3 here
    return dict(rtol=1e-4, atol=3e-4) if c["kind"] == "peaked" else dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tp", WORLDS)
@pytest.mark.parametrize("i", range(len(CASES)), ids=[
    f"{c['kind']}-{c['dtype']}-k{c['k']}-V{c['V']}-{'renorm' if c['renorm'] else 'raw'}-t{c['tau']}-pad{c['pad']}"
    f"-chunk{c['chunk']}" for c in CASES])
def test_matches_single_device(results, tp, i):
    c = CASES[i]
    hs, W, ht, Wt, _, _ = _problem(c, tp)
    Vs = _shard_rows(c, tp)
    ranks = results[tp]
    grad_W = torch.cat([r[i]["grad_W"] for r in ranks])  # the shards reassembled
    got = {**ranks[0][i], "grad_W": grad_W[:c["V"]]}
    assert grad_W.shape == (Vs * tp, H) and not grad_W[c["V"]:].any()  # padding rows: no gradient
    assert got["tokens"] == N
    # which tied id is selected changes the loss and gradients: every single-device path follows the same rule
    for rule in ("lowest_id", "production", "plain"):
        ref = _reference(c, hs, W, ht, Wt, rule)
        for key in ref.keys():
            assert got[key].dtype == ref[key].dtype, key
            torch.testing.assert_close(got[key], ref[key], **_tol(c), msg=lambda m: f"{rule} {key}: {m}")
    if c["kind"] == "ties_free":  # the teacher is unrelated: the other tie rule would have been caught
        other = _reference(c, hs, W, ht, Wt, "highest_id")
        assert not all(torch.allclose(got[key], other[key], **_tol(c)) for key in ("kl_sum", "grad_h", "grad_W"))


@pytest.mark.parametrize("tp", WORLDS[1:])
def test_ranks_agree(results, tp):
    """loss, kl_sum and entropies bit for bit on every rank (the selection is the same everywhere), and the
    all-reduced gradient of the hidden states."""
    for i in range(len(CASES)):
        for r in results[tp][1:]:
            for key in ("loss", "kl_sum", "student_entropy", "teacher_entropy", "grad_h"):
                assert torch.equal(r[i][key], results[tp][0][i][key]), (CASES[i], key)


def testtopk_lowest_id():
    x = torch.tensor([[1., 3., 3., 2., 3., 0.], [5., 5., 5., 5., 5., 5.], [0., 1., 2., 3., 4., 5.]])
    assert topk_lowest_id(x, 2).tolist() == [[1, 2], [0, 1], [4, 5]]
    assert topk_lowest_id(x, 4).tolist() == [[1, 2, 3, 4], [0, 1, 2, 3], [2, 3, 4, 5]]
    assert topk_lowest_id(x, 6).tolist() == [list(range(6))] * 3
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (50, 30), generator=g).double()  # ties everywhere
    for k in (1, 7, 29, 30):
        assert torch.equal(topk_lowest_id(y, k), _selected_lowest_id(y, k).sort(-1).values)
    y[:, 3] = float("-inf")
    assert torch.equal(topk_lowest_id(y, 29), _selected_lowest_id(y, 29).sort(-1).values)


@pytest.mark.parametrize("pad", [0, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_group_of_one_is_topk_reverse_kl(pad, dtype):
    """No process group (one rank) gives topk_reverse_kl bit for bit; padding rows get a zero gradient."""
    c = dict(CASES[4], normalizer=None, V=V, pad=1)
    hs, W, ht, Wt, _, _ = [x.to(dtype) for x in _problem(c, 1)]
    junk = torch.full((pad, H), 100.0, dtype=dtype)
    kw = dict(k=5, temperature=0.7, renormalize=True, chunk_size=8)
    h1, W1 = hs.clone().requires_grad_(), torch.cat([W, junk]).requires_grad_()
    out = vocab_parallel_topk_reverse_kl(h1, W1, ht, torch.cat([Wt, junk]), vocab_size=V, group=None, **kw)
    out.loss.backward()
    h2, W2 = hs.clone().requires_grad_(), W.clone().requires_grad_()
    ref = topk_reverse_kl(h2, W2, ht, Wt, **kw)
    ref.loss.backward()
    for key in ("loss", "kl_sum", "student_entropy", "teacher_entropy"):
        assert torch.equal(getattr(out, key), getattr(ref, key)), key
    assert out.tokens == ref.tokens
    assert torch.equal(h1.grad, h2.grad)
    assert torch.equal(W1.grad[:V], W2.grad) and not W1.grad[V:].any()


def test_validation():
    hs, W, ht, Wt = torch.randn(4, 8), torch.randn(10, 8), torch.randn(4, 6), torch.randn(10, 6)
    call = lambda **kw: vocab_parallel_topk_reverse_kl(**{**dict(student_hidden=hs, student_head_shard=W,
                                                                  teacher_hidden=ht, teacher_head_shard=Wt,
                                                                  vocab_size=10, group=None, k=3), **kw})
    assert call().tokens == 4  # the teacher may have another hidden size
    for kw, msg in [(dict(vocab_size=11), "vocab_size must satisfy"), (dict(vocab_size=0), "vocab_size must"),
                    (dict(k=0), "top-k"), (dict(vocab_size=8, k=9), "top-k"),
                    (dict(temperature=0.0), "temperature"), (dict(chunk_size=0), "chunk_size"),
                    (dict(normalizer=0), "normalizer"), (dict(student_hidden=hs[:0], teacher_hidden=ht[:0]), "N == 0"),
                    (dict(teacher_hidden=ht[:3]), "positions"), (dict(student_head_shard=W[:, :7]), "student head"),
                    (dict(teacher_head_shard=Wt[:9]), "teacher head"), (dict(student_hidden=hs[None]), "[N, H]")]:
        with pytest.raises(ValueError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            call(**kw)
