import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from oel_hpc.train.loss import LossOutput, response_mask, topk_lowest_id, topk_reverse_kl, topk_reverse_kl_reference

TAU = 0.7


def _logits(h, W):
    return h @ W.t()


def _problem(N=11, H=8, V=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    # scale so logits are O(1–3): a peaked but not degenerate distribution, like a real LM head
    hs = (torch.randn(N, H, generator=g) * 0.7).to(dtype).requires_grad_()
    Ws = (torch.randn(V, H, generator=g) * 0.7).to(dtype).requires_grad_()
    ht = (torch.randn(N, H, generator=g) * 0.7).to(dtype)
    Wt = (torch.randn(V, H, generator=g) * 0.7).to(dtype)
    return hs, Ws, ht, Wt


def _ref_from_hidden(hs, Ws, ht, Wt, **kw):
    ones = torch.ones(1, hs.size(0), dtype=torch.bool)
    return topk_reverse_kl_reference(_logits(hs, Ws)[None], _logits(ht, Wt)[None], ones, temperature=TAU, **kw)


# ---------------------------------------------------------------- the top-k tie rule

def _stable_topk(x, k):
    """The rule written the slow, obvious way: a stable descending sort keeps the lower index first among ties."""
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k].sort(-1).values


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_topk_lowest_id_is_the_stable_sort_rule(dtype):
    g = torch.Generator().manual_seed(0)
    few = torch.randint(0, 4, (50, 30), generator=g).to(dtype)  # ties everywhere
    few[:5] = 1.0  # flat rows: every index tied
    rounded = torch.randn(300, 3000, generator=g).to(dtype)  # bf16: most rows tie across the cut at k = 256
    for x, ks in ((few, (1, 2, 7, 29, 30)), (rounded, (1, 256, 2999))):
        for k in ks:
            assert torch.equal(topk_lowest_id(x, k), _stable_topk(x, k)), (dtype, tuple(x.shape), k)
    few[:, 3] = float("-inf")
    assert torch.equal(topk_lowest_id(few, 29), _stable_topk(few, 29))
    batched = few.view(5, 10, 30)  # leading dimensions are rows
    assert torch.equal(topk_lowest_id(batched, 7), _stable_topk(batched, 7))
    if dtype == torch.bfloat16:  # the case the rule is for: ties across the cut in most rows
        kth = rounded.topk(257, dim=-1).values
        assert (kth[:, 255] == kth[:, 256]).float().mean() > 0.5


# ---------------------------------------------------------------- response_mask

@pytest.mark.parametrize("ids,eos,expect", [
    ([[2, 5, 5]], 2, [[1, 0, 0]]),           # EOS at start
    ([[5, 2, 5, 2]], 2, [[1, 1, 0, 0]]),     # middle; a second EOS is still masked
    ([[5, 5, 2]], 2, [[1, 1, 1]]),           # last position
    ([[5, 5, 5]], 2, [[1, 1, 1]]),           # absent: truncated response, all valid
    ([[5, 3, 2, 3]], [2, 3], [[1, 1, 0, 0]]),  # several EOS ids: the first of any counts
    ([[5, 2, 7], [2, 0, 0]], (2,), [[1, 1, 0], [1, 0, 0]]),
])
def test_response_mask(ids, eos, expect):
    m = response_mask(torch.tensor(ids), eos)
    assert m.dtype == torch.bool
    assert m.tolist() == [[bool(x) for x in r] for r in expect]


# ---------------------------------------------------------------- reference vs trl (k = V)

def test_reference_matches_trl_reverse_kl():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    B, L, V = 3, 7, 29
    s = (torch.randn(B, L, V, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(B, L, V, dtype=torch.float64) * 2
    ids = torch.randint(3, V, (B, L))
    ids[0, 2], ids[1, 6] = 1, 1  # EOS mid-row, EOS last; row 2 has none
    mask = response_mask(ids, 1)
    # trl masks with labels == -100, then batchmean with labels = Σ over unmasked tokens / #unmasked tokens,
    # i.e. the same token mean as ours; each token's term is F.kl_div(lq, lp, log_target) = Σ_v p_v (lp_v − lq_v)
    labels = torch.where(mask, ids, torch.full_like(ids, -100))
    ours = topk_reverse_kl_reference(s, t, mask, k=V, temperature=TAU)
    theirs = GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=1.0, temperature=TAU, reduction="batchmean")
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g_ours, = torch.autograd.grad(ours, s)
    g_theirs, = torch.autograd.grad(theirs, s)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)
    assert g_ours[~mask].abs().max() == 0  # positions after EOS get no gradient

    # the sum reduction is our kl_sum on the chunked path (hidden states of the valid positions only)
    theirs_sum = GKDTrainer.generalized_jsd_loss(s.detach(), t, labels=labels, beta=1.0, temperature=TAU,
                                                 reduction="sum")
    torch.testing.assert_close(ours.detach() * mask.sum(), theirs_sum, rtol=1e-12, atol=1e-12)


def test_chunked_full_vocab_matches_trl():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    hs, Ws, ht, Wt = _problem(dtype=torch.float64)
    out = topk_reverse_kl(hs, Ws, ht, Wt, k=Ws.size(0), temperature=TAU, chunk_size=4)
    theirs = GKDTrainer.generalized_jsd_loss(_logits(hs, Ws)[None], _logits(ht, Wt)[None], beta=1.0,
                                             temperature=TAU, reduction="sum")
    torch.testing.assert_close(out.kl_sum, theirs.detach(), rtol=1e-10, atol=1e-12)
    g = torch.autograd.grad(out.loss * out.tokens, (hs, Ws))
    gt = torch.autograd.grad(theirs, (hs, Ws))
    for a, b in zip(g, gt):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- reference vs a hand-written loop (k < V)

def _loop_loss(s, t, mask, k, tau, renormalize):
    total, n = 0.0, 0
    for b in range(s.size(0)):
        for i in range(s.size(1)):
            if not mask[b, i]:
                continue
            lp = torch.log_softmax(s[b, i] / tau, -1)
            lq = torch.log_softmax(t[b, i] / tau, -1)
            order = sorted(range(s.size(-1)), key=lambda v: -lp[v].item())[:k]
            if renormalize:
                zp = torch.logsumexp(torch.stack([lp[v] for v in order]), 0)
                zq = torch.logsumexp(torch.stack([lq[v] for v in order]), 0)
            else:
                zp = zq = 0.0
            for v in order:
                a, c = lp[v] - zp, lq[v] - zq
                total = total + torch.exp(a) * (a - c)
            n += 1
    return total / n


@pytest.mark.parametrize("k", [1, 4, 13])
@pytest.mark.parametrize("renormalize", [False, True])
def test_reference_matches_loop(k, renormalize):
    torch.manual_seed(1)
    B, L, V = 2, 5, 13
    s = (torch.randn(B, L, V, dtype=torch.float64) * 2).requires_grad_()
    t = torch.randn(B, L, V, dtype=torch.float64) * 2
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ours = topk_reverse_kl_reference(s, t, mask, k=k, temperature=TAU, renormalize=renormalize)
    loop = _loop_loss(s, t, mask, k, TAU, renormalize)
    torch.testing.assert_close(ours, loop, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(ours, s)[0], torch.autograd.grad(loop, s)[0],
                               rtol=1e-10, atol=1e-12)
    if renormalize and k == 1:
        assert ours.item() == 0  # one renormalised id: p' = 1 and lp' = lq' = 0


# ---------------------------------------------------------------- chunked path vs reference

@pytest.mark.parametrize("chunk_size", [1, 3, 11, 64])  # N = 11
@pytest.mark.parametrize("k", [1, 5, 37])  # V = 37
@pytest.mark.parametrize("renormalize", [False, True])
def test_chunked_matches_reference_fp32(chunk_size, k, renormalize):
    hs, Ws, ht, Wt = _problem()
    out = topk_reverse_kl(hs, Ws, ht, Wt, k=k, temperature=TAU, renormalize=renormalize, chunk_size=chunk_size)
    assert isinstance(out, LossOutput) and out.tokens == 11
    ref = _ref_from_hidden(hs, Ws, ht, Wt, k=k, renormalize=renormalize)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.kl_sum, ref.detach() * 11, rtol=1e-5, atol=1e-5)
    assert not out.kl_sum.requires_grad and not out.student_entropy.requires_grad
    g = torch.autograd.grad(out.loss, (hs, Ws))
    gr = torch.autograd.grad(ref, (hs, Ws))
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # entropies: plain full-vocab mean
    for e, (h, W) in ((out.student_entropy, (hs, Ws)), (out.teacher_entropy, (ht, Wt))):
        lp = torch.log_softmax(_logits(h, W).detach() / TAU, -1)
        torch.testing.assert_close(e, -(lp.exp() * lp).sum(-1).mean(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 11, 64])
@pytest.mark.parametrize("k", [1, 5, 37])
def test_chunked_matches_reference_bf16(chunk_size, k):
    hs, Ws, ht, Wt = _problem(dtype=torch.bfloat16)
    out = topk_reverse_kl(hs, Ws, ht, Wt, k=k, temperature=TAU, chunk_size=chunk_size)
    assert out.loss.dtype == torch.float32  # softmax math in fp32
    ref = _ref_from_hidden(hs, Ws, ht, Wt, k=k)
    torch.testing.assert_close(out.loss, ref, rtol=2e-2, atol=2e-3)
    g = torch.autograd.grad(out.loss, (hs, Ws))
    gr = torch.autograd.grad(ref, (hs, Ws))
    for a, b in zip(g, gr):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("renormalize", [False, True])
def test_chunked_gradcheck_fp64(renormalize):
    hs, Ws, ht, Wt = _problem(N=5, H=4, V=9, dtype=torch.float64)
    f = lambda h, W: topk_reverse_kl(h, W, ht, Wt, k=4, temperature=TAU, renormalize=renormalize,
                                     chunk_size=2).loss
    assert torch.autograd.gradcheck(f, (hs, Ws))


def test_only_hidden_or_only_weight_trainable():
    hs, Ws, ht, Wt = _problem()
    ref_h, ref_W = torch.autograd.grad(_ref_from_hidden(hs, Ws, ht, Wt, k=5), (hs, Ws))
    g, = torch.autograd.grad(topk_reverse_kl(hs, Ws.detach(), ht, Wt, k=5, temperature=TAU, chunk_size=4).loss, hs)
    torch.testing.assert_close(g, ref_h)
    g, = torch.autograd.grad(topk_reverse_kl(hs.detach(), Ws, ht, Wt, k=5, temperature=TAU, chunk_size=4).loss, Ws)
    torch.testing.assert_close(g, ref_W)


def test_gradients_scale_with_the_upstream_gradient_and_survive_retain_graph():
    # the gradients are computed in the forward: backward must still scale them by what flows in (consolidate
    # backpropagates loss * 0.0 for padding micro-batches) and a retained graph must give them again
    hs, Ws, ht, Wt = _problem()
    ref_h, ref_W = torch.autograd.grad(_ref_from_hidden(hs, Ws, ht, Wt, k=5), (hs, Ws))
    loss = topk_reverse_kl(hs, Ws, ht, Wt, k=5, temperature=TAU, chunk_size=4).loss
    for scale in (3.0, 1.0, 0.0):
        g_h, g_W = torch.autograd.grad(loss * scale, (hs, Ws), retain_graph=True)
        torch.testing.assert_close(g_h, ref_h * scale)
        torch.testing.assert_close(g_W, ref_W * scale)
    loss.backward(retain_graph=True)
    loss.backward()
    torch.testing.assert_close(hs.grad, 2 * ref_h)
    torch.testing.assert_close(Ws.grad, 2 * ref_W)


def test_no_gradient_work_without_grad():
    # V·H = 6400 ≫ chunk·V = 400 and N·H = 512: a [V × H] tensor would mean the head's gradient was built anyway
    N, H, V, chunk = 8, 64, 100, 4
    hs, Ws, ht, Wt = _problem(N=N, H=H, V=V)
    with torch.no_grad(), _MaxNumel() as seen:
        out = topk_reverse_kl(hs, Ws, ht, Wt, k=5, temperature=TAU, chunk_size=chunk)
    assert not out.loss.requires_grad
    assert seen.max == chunk * V, (seen.max, chunk * V)
    torch.testing.assert_close(out.loss, _ref_from_hidden(hs, Ws, ht, Wt, k=5).detach())


# ---------------------------------------------------------------- masking, teacher, normalizer

def test_loss_ignores_positions_after_eos():
    torch.manual_seed(2)
    B, L, H, V = 3, 6, 8, 23
    ids = torch.tensor([[4, 5, 1, 7, 7, 7], [1, 0, 0, 0, 0, 0], [4, 4, 4, 4, 4, 4]])
    mask = response_mask(ids, 1)
    hs, ht = torch.randn(B, L, H), torch.randn(B, L, H)
    Ws, Wt = torch.randn(V, H), torch.randn(V, H)

    def both(hs, ht):
        ref = topk_reverse_kl_reference(_logits(hs, Ws), _logits(ht, Wt), mask, k=5, temperature=TAU)
        out = topk_reverse_kl(hs[mask], Ws, ht[mask], Wt, k=5, temperature=TAU, chunk_size=4)
        return ref, out.loss

    before = both(hs, ht)
    hs2, ht2 = hs.clone(), ht.clone()
    hs2[~mask] = torch.randn_like(hs2[~mask]) * 100
    ht2[~mask] = torch.randn_like(ht2[~mask]) * 100
    after = both(hs2, ht2)
    assert before[0].item() == after[0].item() and before[1].item() == after[1].item()
    torch.testing.assert_close(before[0], before[1])
    assert int(mask.sum()) == 3 + 1 + 6


def test_teacher_gets_no_gradient():
    hs, Ws, ht, Wt = _problem()
    ht.requires_grad_(), Wt.requires_grad_()
    topk_reverse_kl(hs, Ws, ht, Wt, k=5, temperature=TAU, chunk_size=4).loss.backward()
    assert hs.grad is not None and Ws.grad is not None
    assert ht.grad is None and Wt.grad is None
    tl = _logits(ht, Wt)[None]
    topk_reverse_kl_reference(_logits(hs, Ws)[None], tl, torch.ones(1, 11, dtype=torch.bool), k=5,
                              temperature=TAU).backward()
    assert ht.grad is None and Wt.grad is None


def test_normalizer_gradient_accumulation():
    hs, Ws, ht, Wt = _problem(N=12)
    kw = dict(k=5, temperature=TAU, chunk_size=5)
    full = torch.autograd.grad(topk_reverse_kl(hs, Ws, ht, Wt, **kw).loss, (hs, Ws))
    total = torch.zeros(())
    for sl in (slice(0, 5), slice(5, 12)):  # uneven micro-batches
        total = total + topk_reverse_kl(hs[sl], Ws, ht[sl], Wt, normalizer=12, **kw).loss
    acc = torch.autograd.grad(total, (hs, Ws))
    for a, b in zip(full, acc):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # a tensor normalizer (e.g. an all-reduced count) works too
    t = topk_reverse_kl(hs, Ws, ht, Wt, normalizer=torch.tensor(24.0), **kw)
    torch.testing.assert_close(t.loss * 2, t.kl_sum / 12)


# ---------------------------------------------------------------- errors

def test_errors():
    hs, Ws, ht, Wt = _problem()  # V = 37
    with pytest.raises(ValueError, match=r"k=38.*V=37"):
        topk_reverse_kl(hs, Ws, ht, Wt, k=38)
    with pytest.raises(ValueError, match=r"k=0"):
        topk_reverse_kl(hs, Ws, ht, Wt, k=0)
    with pytest.raises(ValueError, match="N == 0"):
        topk_reverse_kl(hs[:0], Ws, ht[:0], Wt, k=5)
    with pytest.raises(ValueError, match="temperature"):
        topk_reverse_kl(hs, Ws, ht, Wt, k=5, temperature=0.0)
    with pytest.raises(ValueError, match="positions"):
        topk_reverse_kl(hs, Ws, ht[:5], Wt, k=5)
    with pytest.raises(ValueError, match="head weight"):
        topk_reverse_kl(hs, Ws, ht, Wt[:30], k=5)
    with pytest.raises(ValueError, match="normalizer"):
        topk_reverse_kl(hs, Ws, ht, Wt, k=5, normalizer=0)
    s = torch.randn(1, 3, 37)
    with pytest.raises(ValueError, match=r"k=40.*V=37"):
        topk_reverse_kl_reference(s, s, torch.ones(1, 3, dtype=torch.bool), k=40, temperature=TAU)
    with pytest.raises(ValueError, match="no valid"):
        topk_reverse_kl_reference(s, s, torch.zeros(1, 3, dtype=torch.bool), k=5, temperature=TAU)


# ---------------------------------------------------------------- memory boundedness

class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op allocates (forward and backward both run through here); views and
    in-place or out= results share an argument's storage and allocate nothing."""

    def __init__(self):
        super().__init__()
        self.max = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for o in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() not in given:
                self.max = max(self.max, o.numel())
        return out


def test_chunked_never_materialises_n_by_v():
    # N·V = 512k ≫ chunk·V = 32k; what legitimately scales past a chunk stays below it here: the gradients
    # computed in the forward (N·H = 8k, V·H = 16k)
    N, H, V, chunk, k = 512, 16, 1000, 32, 16
    hs, Ws, ht, Wt = _problem(N=N, H=H, V=V)
    with _MaxNumel() as fwd:
        out = topk_reverse_kl(hs, Ws, ht, Wt, k=k, temperature=TAU, chunk_size=chunk)
    with _MaxNumel() as bwd:  # the gradients were computed in the forward: backward only hands them over
        out.loss.backward()
    assert hs.grad is not None and Ws.grad is not None
    assert fwd.max == chunk * V, (fwd.max, chunk * V)  # == : the mode does see the chunks
    assert bwd.max <= V * H, (bwd.max, V * H)
    # positive control: the naive path does create [N × V] tensors, and the mode sees its backward too
    with _MaxNumel() as naive:
        _ref_from_hidden(hs, Ws, ht, Wt, k=k).backward()
    assert naive.max >= N * V
