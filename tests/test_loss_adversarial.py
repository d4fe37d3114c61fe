"""The loss's implementations (chunked; fused where CUDA and triton are) against the reference on adversarial
inputs: exact ties in the top-k, very peaked and very flat distributions, all-masked rows, k = 1 and k = V,
renormalize on/off, fp32 and bf16; the impl selection; consolidate.loss_impl; a smoke run of tools/bench_loss.py.

tests/test_loss.py covers the generic cases (random logits, chunk sizes, gradcheck, trl oracle, memory bound);
this file covers what breaks implementations. Where the student's logits tie at the k-th place, the top-k set is
not unique and the loss depends on which tied id is taken (the teacher differs between them): every implementation
follows one rule, the lowest ids among the tied win (loss/common.py's topk_lowest_id; the fused kernels' keys), so the
oracle computes that one set itself (a stable descending sort) and requires the implementation's value *and*
gradients to be those of it — per row, the same set in forward and backward. To control ties exactly in fp32 and
bf16 alike, most cases use an identity head (H = V, W = I): the logits are the hidden states, bit for bit, in any
dtype.

The fused cases run where CUDA and triton are, or on the CPU in Triton's interpreter when the environment has
TRITON_INTERPRET=1 (set before python starts: triton reads it at import), e.g.
    TRITON_INTERPRET=1 python -m pytest -q tests/test_loss_adversarial.py -k fused
"""
import importlib.util
import itertools
import os
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from oel_hpc.train.loss import dispatch as loss_mod
from oel_hpc.train.loss import LossOutput, resolve_impl, topk_reverse_kl, topk_reverse_kl_reference
from tests.conftest import ROOT, compose

TAU = 0.7


INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's interpreter: the fused kernels on the CPU


def _fused_unavailable() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "the fused loss needs triton"
    if not torch.cuda.is_available() and not INTERPRET:
        return "the fused loss needs CUDA (or TRITON_INTERPRET=1 in the environment: the kernels on the CPU, slowly)"
    return None


IMPLS = ["chunked", pytest.param("fused", marks=pytest.mark.skipif(_fused_unavailable() is not None,
                                                                    reason=str(_fused_unavailable())))]
DTYPES = [torch.float32, torch.bfloat16]


def _device(impl):
    return torch.device("cuda" if impl == "fused" and torch.cuda.is_available() else "cpu")


def _loss(impl, hs, Ws, ht, Wt, **kw) -> LossOutput:
    """topk_reverse_kl with this impl; the fused kernels on CPU tensors (interpreter) are called directly, since
    topk_reverse_kl refuses impl='fused' off the GPU."""
    if impl == "fused" and not hs.is_cuda:
        from oel_hpc.train.loss.fused import fused_topk_reverse_kl

        kw.pop("chunk_size", None)
        return fused_topk_reverse_kl(hs, Ws, ht.detach(), Wt.detach(), **kw)
    return topk_reverse_kl(hs, Ws, ht, Wt, impl=impl, **kw)


def _tol(dtype, impl):
    """(value rtol, gradient rtol). With an identity head the logits are exact in any dtype and the softmax math
    is fp32, so the value is tight even in bf16; gradients are returned in the input dtype (bf16: ~3 digits)."""
    value = 1e-5 if impl == "chunked" else 1e-4
    grad = 2e-2 if dtype == torch.bfloat16 else (1e-4 if impl == "chunked" else 1e-3)
    return value, grad


def _close(a, b, rtol, what):
    a, b = a.double().cpu(), b.double().cpu()
    scale = max(b.abs().max().item(), 1e-12)
    err = (a - b).abs().max().item()
    assert err <= rtol * scale + 1e-7, f"{what}: max abs err {err:.3g} vs scale {scale:.3g} (rtol {rtol})"


def _run(impl, hs, Ws, ht, Wt, **kw):
    """The implementation on (copies of) the inputs: (LossOutput, d loss/d hs, d loss/d Ws), on the CPU."""
    dev = _device(impl)
    hs_ = hs.detach().to(dev).requires_grad_()
    Ws_ = Ws.detach().to(dev).requires_grad_()
    out = _loss(impl, hs_, Ws_, ht.to(dev), Wt.to(dev), temperature=TAU, **kw)
    gh, gW = torch.autograd.grad(out.loss, (hs_, Ws_))
    assert gh.dtype == hs.dtype and gW.dtype == Ws.dtype
    return out, gh.cpu(), gW.cpu()


# ------------------------------------------------------------------------------- the lowest-id oracle (fp64)

def _topk_sets(lp_row: torch.Tensor, k: int) -> list[tuple[int, ...]]:
    """Every k-subset a top-k may return (all ids above the k-th value plus any choice among its ties), the one the
    tie rule picks first: the lowest tied ids."""
    thr = lp_row.sort(descending=True).values[k - 1]
    above = tuple(int(v) for v in torch.nonzero(lp_row > thr).flatten())
    tied = sorted(int(v) for v in torch.nonzero(lp_row == thr).flatten())
    return [above + c for c in itertools.combinations(tied, k - len(above))]  # lexicographic: lowest ids first


def _row_loss(h, Ws, ht, Wt, ids, renormalize):
    lp = F.log_softmax((h @ Ws.t()) / TAU, -1)[list(ids)]
    lq = F.log_softmax((ht @ Wt.t()) / TAU, -1)[list(ids)]
    if renormalize:
        lp, lq = lp - lp.logsumexp(-1), lq - lq.logsumexp(-1)
    return (lp.exp() * (lp - lq)).sum()


def _oracle_candidates(hs, Ws, ht, Wt, k, renormalize):
    """Per row: [(ids, ℓ, dℓ/dh_row, dℓ/dWs)] for every top-k set, the rule's (lowest ids) first, in fp64 from the
    exact input values. The student's logits are those the implementation sees: hs @ Ws.T in the input dtype
    (exact for W = I)."""
    z = (hs @ Ws.t()).double()
    H64 = [x.detach().double() for x in (hs, Ws, ht, Wt)]
    rows = []
    for r in range(hs.size(0)):
        cands = []
        for ids in _topk_sets(torch.log_softmax(z[r] / TAU, -1), k):
            h = H64[0][r].clone().requires_grad_()
            W = H64[1].clone().requires_grad_()
            val = _row_loss(h, W, H64[2][r], H64[3], ids, renormalize)
            gh, gW = torch.autograd.grad(val, (h, W))
            cands.append((ids, val.detach(), gh, gW))
        rows.append(cands)
    return rows


def _assert_matches_lowest_id_set(impl, hs, Ws, ht, Wt, k, renormalize, chunk_size=2):
    """The implementation's loss and gradients are those of the lowest-id top-k set of every row (the same set in
    forward and backward). Returns the number of rows where another valid set would have given another d loss/d h
    (where the test tells the rule from any other)."""
    N = hs.size(0)
    out, gh, gW = _run(impl, hs, Ws, ht, Wt, k=k, renormalize=renormalize, chunk_size=chunk_size)
    assert out.tokens == N and torch.isfinite(out.loss) and torch.isfinite(gh).all() and torch.isfinite(gW).all()
    vtol, gtol = _tol(hs.dtype, impl)
    total, gW_ref, decisive = 0.0, torch.zeros(Ws.shape, dtype=torch.float64), 0
    gW_terms = torch.zeros_like(gW_ref)  # Σ of the rows' |contributions|: what 16-bit rounding is relative to
    for r, cands in enumerate(_oracle_candidates(hs, Ws, ht, Wt, k, renormalize)):
        def err(c):
            return (gh[r].double() - c[2] / N).abs().max().item()
        rule = cands[0]
        scale = max(max(c[2].abs().max().item() for c in cands) / N, 1e-12)
        assert err(rule) <= gtol * scale + 1e-6, (
            f"row {r}: d loss/d h is not that of the lowest-id top-{k} set {rule[0]} (err {err(rule):.3g}, scale "
            f"{scale:.3g}); closest of the {len(cands)} valid sets: {min(cands, key=err)[0]}")
        decisive += any(err(c) > gtol * scale + 1e-6 for c in cands[1:])
        assert len(set(rule[0])) == k  # k distinct ids: a tie never counts an id twice
        total += rule[1].item()
        gW_ref += rule[3] / N
        gW_terms += rule[3].abs() / N
    _close(out.kl_sum, torch.tensor(total), vtol, "Σ ℓ")
    _close(out.loss, torch.tensor(total / N), vtol, "loss")
    # rows of opposite sign cancel in a head row several of them select (the lowest ids are shared), and each
    # row's bf16-rounded part keeps its own rounding: measure against the terms, not their sum
    err = (gW.double() - gW_ref).abs().max().item()
    assert err <= gtol * gW_terms.max().item() + 1e-7, f"d loss/d W: max abs err {err:.3g} (rtol {gtol})"
    # the reference follows the same rule
    ref = topk_reverse_kl_reference((hs @ Ws.t())[None], (ht @ Wt.t())[None], torch.ones(1, N, dtype=torch.bool),
                                    k=k, temperature=TAU, renormalize=renormalize)
    _close(out.loss, ref.detach(), vtol, "loss vs reference")
    return decisive


def _identity_problem(student_rows, teacher_rows, dtype):
    """Logits as hidden states: W = I (H = V), so z = h exactly in fp32 and bf16 alike."""
    hs = torch.tensor(student_rows, dtype=torch.float64).to(dtype)
    ht = torch.tensor(teacher_rows, dtype=torch.float64).to(dtype)
    V = hs.size(1)
    eye = torch.eye(V, dtype=dtype)
    return hs, eye.clone(), ht, eye.clone()


def _grid_rows(N, V, seed, lo=-4.0, step=0.5):
    """N rows of V distinct values on a 0.5 grid (exact in bf16), shuffled per row: no ties."""
    g = torch.Generator().manual_seed(seed)
    grid = lo + step * torch.arange(V, dtype=torch.float64)
    return torch.stack([grid[torch.randperm(V, generator=g)] for _ in range(N)]).tolist()


V_SMALL = 8
KS = [1, 3, V_SMALL]


# ------------------------------------------------------------------------------- exact ties

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k", KS)
def test_ties_at_the_kth_place(impl, dtype, renormalize, k):
    # rows with pairs/triples of equal logits at and around the cut for k = 1 and k = 3; teacher random (distinct),
    # so the loss does depend on which tied id is taken
    student = [[2.0, 2.0, 1.0, 0.5, 0.5, 0.5, -1.0, -3.0],   # k=1: tie of 2; k=3: tie of 3 at 0.5
               [1.5, -2.0, 1.0, 1.0, 1.0, -2.0, 0.0, -0.5],  # k=3: the whole tie group of 1.0 fits, k=1 unique
               [0.0, 3.0, 3.0, 3.0, 3.0, -1.0, -1.0, 2.5]]   # k=1 and k=3: choose among four tied ids
    teacher = _grid_rows(3, V_SMALL, seed=1)
    hs, Ws, ht, Wt = _identity_problem(student, teacher, dtype)
    decisive = _assert_matches_lowest_id_set(impl, hs, Ws, ht, Wt, k, renormalize)
    # rows where another tie choice would have been caught: two of three for k = 1 and 3 (with renormalize at
    # k = 1, ℓ is 0 for any single id), none at k = V
    assert decisive == (0 if k == V_SMALL or (renormalize and k == 1) else 2)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 5, 12])
def test_ties_from_duplicate_head_rows(impl, dtype, k):
    """A real (dense, random) head whose rows repeat, in student and teacher alike: exact ties in any dtype, so the
    tie rule decides which copy of a row is selected and gets the selected part of d/dW: the lower one."""
    g = torch.Generator().manual_seed(3)
    N, H, base, dup = 9, 16, 8, 4  # V = 12: rows 8..11 repeat rows 0..3
    hs = (torch.randn(N, H, generator=g) * 0.7).to(dtype)
    ht = (torch.randn(N, H, generator=g) * 0.7).to(dtype)
    A, B = torch.randn(base, H, generator=g) * 0.7, torch.randn(base, H, generator=g) * 0.7
    Ws, Wt = torch.cat([A, A[:dup]]).to(dtype), torch.cat([B, B[:dup]]).to(dtype)
    mask = torch.ones(1, N, dtype=torch.bool)
    vtol, gtol = _tol(dtype, impl)
    if dtype == torch.bfloat16:  # dense bf16 GEMMs: logits rounded to bf16, as in test_loss.py's bf16 case
        vtol = 2e-2
    for renormalize in (False, True):
        out, gh, gW = _run(impl, hs, Ws, ht, Wt, k=k, renormalize=renormalize, chunk_size=4)
        hs_r = hs.detach().clone().requires_grad_()
        Ws_r = Ws.detach().clone().requires_grad_()
        ref = topk_reverse_kl_reference((hs_r @ Ws_r.t())[None], (ht @ Wt.t())[None], mask, k=k,
                                        temperature=TAU, renormalize=renormalize)
        rh, rW = torch.autograd.grad(ref, (hs_r, Ws_r))
        _close(out.loss, ref.detach(), vtol, "loss")
        _close(gh, rh, gtol, "d/dh")

        # the selected part of a duplicated row's gradient goes to the lower copy (the tie rule), in the
        # reference too ...
        _close(gW, rW, gtol, "d/dW")
        # ... and the copies' gradients differ where only one of them is selected: picking the upper copy fails
        # (renormalised over one id, ℓ is 0 whatever is selected)
        if k < base + dup and not (renormalize and k == 1):
            assert (rW[:dup] - rW[base:]).abs().max() > 2 * gtol * rW.abs().max()


# ------------------------------------------------------------------------------- very peaked

def _peaked_rows(N, V, seed, same_top):
    """Student: one id at +35, the rest −35 − j (z/τ from +50 down to below −100; integers: exact in bf16, no ties).
    Teacher: the same shape, its top id the student's (same_top) or another one."""
    g = torch.Generator().manual_seed(seed)
    vals = torch.tensor([35.0] + [-35.0 - j for j in range(V - 1)], dtype=torch.float64)
    s, t = [], []
    for _ in range(N):
        ps, pt = torch.randperm(V, generator=g), torch.randperm(V, generator=g)
        i = int((pt == ps[0]).nonzero()) if same_top else (1 if pt[0] == ps[0] else 0)
        pt[[0, i]] = pt[[i, 0]]
        zs, zt = torch.empty(V, dtype=torch.float64), torch.empty(V, dtype=torch.float64)
        zs[ps], zt[pt] = vals, vals
        s.append(zs.tolist())
        t.append(zt.tolist())
    return s, t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("same_top", [True, False])
def test_very_peaked(impl, dtype, renormalize, k, same_top):
    s, t = _peaked_rows(4, V_SMALL, seed=5, same_top=same_top)
    for zs, zt in zip(s, t):
        assert (max(range(V_SMALL), key=zs.__getitem__) == max(range(V_SMALL), key=zt.__getitem__)) == same_top
    hs, Ws, ht, Wt = _identity_problem(s, t, dtype)
    _assert_matches_lowest_id_set(impl, hs, Ws, ht, Wt, k, renormalize)
    out, _, _ = _run(impl, hs, Ws, ht, Wt, k=k, renormalize=renormalize, chunk_size=3)
    if not same_top and not renormalize:
        # p ≈ 1 on an id where the teacher has log-prob ≈ −100 − ...: ℓ ≈ 100 and more, no overflow, no NaN
        assert out.loss.item() > 90
    if same_top and k < V_SMALL:
        assert out.loss.item() < 1e-6 or renormalize  # both one-hot on the same id: ≈ 0 (renormalised too)


@pytest.mark.parametrize("impl", IMPLS)
def test_very_peaked_dense_head_fp32(impl):
    """A dense random head with hidden states scaled until z/τ spans about ±100: no NaN, matches the reference."""
    g = torch.Generator().manual_seed(7)
    N, H, V = 10, 8, 37
    hs, ht = torch.randn(N, H, generator=g) * 30, torch.randn(N, H, generator=g) * 30
    Ws, Wt = torch.randn(V, H, generator=g) * 0.7, torch.randn(V, H, generator=g) * 0.7
    for k in (1, 5, V):
        for renormalize in (False, True):
            out, gh, gW = _run(impl, hs, Ws, ht, Wt, k=k, renormalize=renormalize, chunk_size=3)
            hs_r, Ws_r = hs.clone().requires_grad_(), Ws.clone().requires_grad_()
            ref = topk_reverse_kl_reference((hs_r @ Ws_r.t())[None], (ht @ Wt.t())[None],
                                            torch.ones(1, N, dtype=torch.bool), k=k, temperature=TAU,
                                            renormalize=renormalize)
            rh, rW = torch.autograd.grad(ref, (hs_r, Ws_r))
            vtol, gtol = _tol(torch.float32, impl)
            _close(out.loss, ref.detach(), vtol, f"loss k={k} renorm={renormalize}")
            _close(gh, rh, gtol, "d/dh")
            _close(gW, rW, gtol, "d/dW")
            if not renormalize:
                assert out.loss.item() > 1  # far-apart peaks: a large loss, computed without overflow


# ------------------------------------------------------------------------------- very flat

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k", KS)
def test_flat_student(impl, dtype, renormalize, k):
    """All student logits equal (every id tied: any k-subset is a valid top-k) against a random teacher."""
    student = [[0.0] * V_SMALL, [1.5] * V_SMALL, [-3.0] * V_SMALL]
    hs, Ws, ht, Wt = _identity_problem(student, _grid_rows(3, V_SMALL, seed=2), dtype)
    _assert_matches_lowest_id_set(impl, hs, Ws, ht, Wt, k, renormalize)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k", KS)
def test_flat_student_and_teacher(impl, dtype, renormalize, k):
    """Both uniform: ℓ = 0 exactly (p = q on every id), whatever the tie-break; the gradient is that of the set."""
    student = [[0.0] * V_SMALL, [2.0] * V_SMALL]
    teacher = [[-1.0] * V_SMALL, [0.0] * V_SMALL]
    hs, Ws, ht, Wt = _identity_problem(student, teacher, dtype)
    _assert_matches_lowest_id_set(impl, hs, Ws, ht, Wt, k, renormalize)
    out, _, _ = _run(impl, hs, Ws, ht, Wt, k=k, renormalize=renormalize)
    assert abs(out.loss.item()) < 1e-6
    torch.testing.assert_close(out.student_entropy, torch.tensor(float(torch.log(torch.tensor(8.0)))),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- masked rows

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("k", [1, 5, 16])
def test_all_masked_rows_contribute_nothing(impl, dtype, renormalize, k):
    """A batch with rows that have no valid position (padding rows) and rows cut short: the trainer feeds only
    the valid positions, so what the masked ones hold — even NaN and inf — changes nothing, and they get exactly
    zero gradient. The value is the reference's token mean over the mask."""
    B, L, V = 4, 5, 16
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    zs = torch.tensor(_grid_rows(B * L, V, seed=11), dtype=torch.float64).reshape(B, L, V).to(dtype)
    zt = torch.tensor(_grid_rows(B * L, V, seed=12), dtype=torch.float64).reshape(B, L, V).to(dtype)
    eye = torch.eye(V, dtype=dtype)
    garbage = zs.clone()
    garbage[~mask] = torch.tensor([float("nan"), float("inf")] * (V // 2), dtype=dtype)
    garbage_t = zt.clone()
    garbage_t[~mask] = float("-inf")

    dev = _device(impl)
    results = []
    for s, t in ((zs, zt), (garbage, garbage_t)):
        hs = s.to(dev).requires_grad_()
        out = _loss(impl, hs[mask.to(dev)], eye.to(dev), t.to(dev)[mask.to(dev)], eye.to(dev), k=k,
                    temperature=TAU, renormalize=renormalize, chunk_size=3)
        g, = torch.autograd.grad(out.loss, hs)
        assert out.tokens == int(mask.sum()) == 8
        assert (g[~mask.to(dev)] == 0).all()  # exactly zero, not NaN, at masked positions
        results.append((out.loss.detach().cpu(), g.cpu()))
    assert results[0][0].item() == results[1][0].item()
    assert torch.equal(results[0][1], results[1][1])

    s_ref = zs.double().requires_grad_()
    ref = topk_reverse_kl_reference(s_ref, zt.double(), mask, k=k, temperature=TAU, renormalize=renormalize)
    vtol, gtol = _tol(dtype, impl)
    _close(results[0][0], ref.detach(), vtol, "loss vs reference")
    _close(results[0][1], torch.autograd.grad(ref, s_ref)[0], gtol, "d/dh vs reference")


@pytest.mark.parametrize("impl", ["auto", "chunked", "fused"])
def test_everything_masked_raises_not_zero(impl):
    """No valid position at all (every row masked): an error, never a silent 0 loss — whatever the impl, and even
    with an explicit normalizer; the reference too."""
    B, L, H, V = 3, 4, 8, 11
    hs, ht = torch.randn(B, L, H), torch.randn(B, L, H)
    Ws, Wt = torch.randn(V, H), torch.randn(V, H)
    mask = torch.zeros(B, L, dtype=torch.bool)
    for normalizer in (None, 5):
        with pytest.raises(ValueError, match="no valid response tokens"):
            topk_reverse_kl(hs[mask], Ws, ht[mask], Wt, k=3, impl=impl, normalizer=normalizer)
    with pytest.raises(ValueError, match="no valid response tokens"):
        topk_reverse_kl_reference(hs @ Ws.t(), ht @ Wt.t(), mask, k=3, temperature=TAU)


# ------------------------------------------------------------------------------- impl selection

def test_fused_on_cpu_raises():
    hs, Ws, ht, Wt = torch.randn(4, 8), torch.randn(11, 8), torch.randn(4, 8), torch.randn(11, 8)
    with pytest.raises(ValueError, match=r"'fused'.*CUDA.*cpu"):
        topk_reverse_kl(hs, Ws, ht, Wt, k=3, impl="fused")
    with pytest.raises(ValueError, match=r"auto, chunked, fused.*'triton'"):
        topk_reverse_kl(hs, Ws, ht, Wt, k=3, impl="triton")


def test_auto_on_cpu_is_chunked(monkeypatch):
    def no_probe():
        raise AssertionError("auto must not probe triton for CPU tensors")
    monkeypatch.setattr(loss_mod, "_triton_imports", no_probe)
    g = torch.Generator().manual_seed(0)
    hs, Ws = torch.randn(6, 8, generator=g).requires_grad_(), torch.randn(11, 8, generator=g).requires_grad_()
    ht, Wt = torch.randn(6, 8, generator=g), torch.randn(11, 8, generator=g)
    assert resolve_impl("auto", hs, Ws, ht, Wt) == "chunked"
    a = topk_reverse_kl(hs, Ws, ht, Wt, k=3, chunk_size=4)  # impl defaults to auto
    b = topk_reverse_kl(hs, Ws, ht, Wt, k=3, chunk_size=4, impl="chunked")
    assert a.loss.item() == b.loss.item() and a.student_entropy.item() == b.student_entropy.item()
    assert torch.equal(torch.autograd.grad(a.loss, hs)[0], torch.autograd.grad(b.loss, hs)[0])


def _fake_cuda(dtype=torch.float32):
    return types.SimpleNamespace(is_cuda=True, dtype=dtype, device=torch.device("cuda", 0))


def test_auto_picks_fused_on_cuda_when_triton_imports(monkeypatch):
    """The rule without a GPU: CUDA tensors + triton → fused; no triton, or fp64 (gradcheck) → chunked; asking
    for fused without triton raises."""
    t = [_fake_cuda()] * 4
    monkeypatch.setattr(loss_mod, "_triton_imports", lambda: True)
    assert resolve_impl("auto", *t) == "fused"
    assert resolve_impl("auto", *[_fake_cuda(torch.bfloat16)] * 4) == "fused"
    assert resolve_impl("auto", *[_fake_cuda(torch.float64)] * 4) == "chunked"
    assert resolve_impl("auto", *t, k=257) == "chunked"  # beyond the kernels' top-k range
    assert resolve_impl("chunked", *t) == "chunked"
    monkeypatch.setattr(loss_mod, "_triton_imports", lambda: False)
    assert resolve_impl("auto", *t) == "chunked"
    with pytest.raises(ValueError, match="triton"):
        resolve_impl("fused", *t)


def test_fused_dispatch_imports_loss_triton_lazily(monkeypatch):
    """impl=fused hands the validated arguments to loss/fused.py's fused_topk_reverse_kl (teacher detached, the
    normalizer resolved) and returns its LossOutput; a stand-in module takes the kernel's place here."""
    calls = []
    sentinel = LossOutput(torch.tensor(1.0), torch.tensor(6.0), 6, torch.tensor(0.0), torch.tensor(0.0))

    def fused_topk_reverse_kl(hs, Ws, ht, Wt, *, k, temperature, renormalize, normalizer=None):
        calls.append(dict(hs=hs, Ws=Ws, ht=ht, Wt=Wt, k=k, temperature=temperature, renormalize=renormalize,
                          normalizer=normalizer))
        return sentinel
    monkeypatch.setitem(sys.modules, "oel_hpc.train.loss.fused",
                        types.SimpleNamespace(fused_topk_reverse_kl=fused_topk_reverse_kl))
    monkeypatch.setattr(loss_mod, "resolve_impl", lambda impl, *t, k=1: "fused" if impl == "fused" else "chunked")
    hs, Ws = torch.randn(6, 8).requires_grad_(), torch.randn(11, 8).requires_grad_()
    ht, Wt = torch.randn(6, 8).requires_grad_(), torch.randn(11, 8).requires_grad_()
    out = topk_reverse_kl(hs, Ws, ht, Wt, k=4, temperature=0.5, renormalize=True, chunk_size=2, impl="fused")
    assert out is sentinel and len(calls) == 1
    c = calls[0]
    assert (c["k"], c["temperature"], c["renormalize"], c["normalizer"]) == (4, 0.5, True, 6)
    assert c["hs"] is hs and c["Ws"] is Ws
    assert not c["ht"].requires_grad and not c["Wt"].requires_grad  # the teacher carries no gradient
    topk_reverse_kl(hs, Ws, ht, Wt, k=4, normalizer=24, impl="fused")
    assert calls[1]["normalizer"] == 24
    with pytest.raises(ValueError, match="k=12"):  # validation happens before the dispatch
        topk_reverse_kl(hs, Ws, ht, Wt, k=12, impl="fused")


def test_torch_trainer_passes_impl(monkeypatch):
    from oel_hpc.train.torch import trainer as torch_trainer

    g = torch.Generator().manual_seed(0)
    h, Ws = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g).requires_grad_()
    ht, Wt = torch.randn(5, 8, generator=g), torch.randn(11, 8, generator=g)
    monkeypatch.setattr(torch_trainer, "decoder_hidden", lambda model, ids, attention, positions: h)
    from oel_hpc.train.precision import Precision

    d = torch_trainer.Distiller(types.SimpleNamespace(lm_head=types.SimpleNamespace(weight=Ws)),
                                Precision(torch.float32, torch.float32, torch.float32))
    kw = dict(k=3, temperature=TAU, renormalize=False, chunk_size=2)
    with pytest.raises(ValueError, match="'fused'.*CUDA"):
        d(None, None, None, ht, Wt, 5, impl="fused", **kw)
    loss, kl, _, _ = d(None, None, None, ht, Wt, 5, impl="chunked", **kw)
    assert loss.item() == topk_reverse_kl(h, Ws, ht, Wt, normalizer=5, **kw).loss.item()
    assert d(None, None, None, ht, Wt, 5, **kw)[0].item() == loss.item()  # impl omitted: auto


def test_megatron_trainer_impl(monkeypatch):
    """Vocab-parallel (tp > 1) is chunked only: impl=fused raises before any collective; at tp = 1 the impl goes
    to topk_reverse_kl (head sliced to the real vocabulary, as the vocab-parallel loss does at tp = 1)."""
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    from oel_hpc.train.megatron import trainer as mt

    g = torch.Generator().manual_seed(0)
    V, Vp = 11, 12  # padded vocabulary rows, as megatron pads the head
    h, ht = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    Ws, Wt = torch.randn(Vp, 8, generator=g).requires_grad_(), torch.randn(Vp, 8, generator=g)
    monkeypatch.setattr(mt, "output_weight", lambda model: model)
    fake = types.SimpleNamespace(tp=2, _hidden=lambda model, s, l, p: h, student=Ws, teacher=Wt, vocab_size=V,
                                 tp_group=None)
    args = dict(k=3, temperature=TAU, renormalize=False, chunk_size=2)
    with pytest.raises(ValueError, match="not vocab-parallel.*tp=2"):
        mt.MegatronTrainer.student_loss(fake, None, None, None, ht, 5, dict(args, impl="fused"))
    fake.tp = 1
    want = topk_reverse_kl(h, Ws[:V], ht, Wt[:V], normalizer=5, **args).loss.item()
    for impl in ("auto", "chunked", None):
        la = dict(args) if impl is None else dict(args, impl=impl)
        assert mt.MegatronTrainer.student_loss(fake, None, None, None, ht, 5, la)[0].item() == want
    with pytest.raises(ValueError, match="'fused'.*CUDA"):
        mt.MegatronTrainer.student_loss(fake, None, None, None, ht, 5, dict(args, impl="fused"))


# ------------------------------------------------------------------------------- consolidate.loss_impl

@pytest.mark.parametrize("overrides,ok", [
    ([], True),
    (["consolidate.loss_impl=chunked"], True),
    (["consolidate.loss_impl=fused", "trainer.device=cuda"], True),
    (["consolidate.loss_impl=fused", "trainer.device=auto"], True),  # decided at run time (the loss raises off GPU)
    (["consolidate.loss_impl=triton"], False),
    (["consolidate.loss_impl=fused", "trainer.device=cpu"], False),
    (["consolidate.loss_impl=fused", "trainer=megatron", "trainer.tp=2", "cluster=local_slurm"], False),
    (["consolidate.loss_impl=auto", "trainer=megatron", "trainer.tp=2", "cluster=local_slurm"], True),
])
def test_config_loss_impl(overrides, ok):
    from oel_hpc.config import ConfigError, validate

    if "trainer=megatron" in overrides:
        pytest.importorskip("megatron.core", reason="trainer=megatron validates only with megatron-core installed")

    if ok:
        validate(compose(overrides), check_files=False)
        return
    with pytest.raises(ConfigError) as e:  # an unknown name already when composing (the schema's enum)
        validate(compose(overrides), check_files=False)
    assert e.value.key == "consolidate.loss_impl"


# ------------------------------------------------------------------------------- the benchmark script

def test_bench_loss_smoke():
    cmd = [sys.executable, str(ROOT / "tools" / "bench_loss.py"), "--shape", "64,32,500,16", "--reps", "1",
           "--device", "cpu", "--rounds", "1"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = p.stdout
    for needle in ("naive full [T×V] logits", "ours: chunked", "n/a (GPU only)", "Liger", "FULL-vocabulary",
                   "targets:", "1/8 of naive", "1.3× naive", "below Liger"):
        assert needle in out, (needle, out)
    assert "error" not in out, out
    p = subprocess.run(cmd[:4] + ["--check", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0 and "PASSED" in p.stdout, p.stdout + p.stderr[-2000:]
