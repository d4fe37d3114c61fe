"""The HF engine (batched, left-padded generate) and the trainer's response-position bookkeeping."""
import torch
from omegaconf import OmegaConf

from oel_hpc.engines.hf import HFEngine, row_seeds_for
from oel_hpc.train.consolidate import Sample, micro_batches
from oel_hpc.train.torch.trainer import response_hidden
from oel_hpc.train.loss import topk_reverse_kl, topk_reverse_kl_reference

GREEDY = OmegaConf.create({"temperature": 0.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 12})
SAMPLED = OmegaConf.create({"temperature": 0.7, "top_p": 1.0, "top_k": 0, "max_new_tokens": 12})


def prompts(engine):
    texts = ["P _ H", "You are P on a small grid. Reach the goal.", "[up] [down] [left] [right] P _ H G G G"]
    return [engine.chat_ids([{"role": "user", "content": t}]) for t in texts]


def test_left_padded_batch_equals_one_by_one(random_model_dir):
    engine = HFEngine.load(str(random_model_dir), device="cpu")
    ps = prompts(engine)
    assert len({len(p) for p in ps}) == 3  # really different lengths, so padding matters
    batch = engine.generate(ps, GREEDY, seed=0)
    single = [engine.generate([p], GREEDY, seed=0)[0] for p in ps]
    assert [c.token_ids for c in batch] == [c.token_ids for c in single]
    for c in batch:
        assert len(c.token_ids) <= 12
        if c.finished:
            assert c.token_ids[-1] in engine.eos_token_ids and c.token_ids.count(c.token_ids[-1]) >= 1


def test_sampling_is_seeded_and_leaves_global_rng_alone(random_model_dir):
    engine = HFEngine.load(str(random_model_dir), device="cpu")
    ps = prompts(engine)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = engine.generate(ps, SAMPLED, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = engine.generate(ps, SAMPLED, seed=7)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]
    c = engine.generate(ps, SAMPLED, seed=8)
    assert [x.token_ids for x in a] != [x.token_ids for x in c]


def test_a_rows_sample_does_not_depend_on_its_batch(random_model_dir):
    """Per-row seeded sampling: a row sampled alone, inside a batch (at another position, beside other rows and
    other padding), or in a batch split by max_batch gets the same completion. Data-parallel consolidation relies
    on it: a row gives the same sample whichever rank, micro-batch or neighbours it lands with."""
    engine = HFEngine.load(str(random_model_dir), device="cpu")
    ps = prompts(engine)
    sampling = OmegaConf.create({"temperature": 0.7, "top_p": 0.9, "top_k": 50, "max_new_tokens": 12})
    seeds = [101, 202, 303]
    batch = [c.token_ids for c in engine.generate(ps, sampling, seed=0, row_seeds=seeds)]
    alone = [engine.generate([p], sampling, seed=0, row_seeds=[s])[0].token_ids for p, s in zip(ps, seeds)]
    assert batch == alone
    reordered = engine.generate(ps[::-1] + ps[:1], sampling, seed=0, row_seeds=seeds[::-1] + seeds[:1])
    assert [c.token_ids for c in reordered] == batch[::-1] + batch[:1]
    engine.max_batch = 2
    assert [c.token_ids for c in engine.generate(ps, sampling, seed=0, row_seeds=seeds)] == batch
    # seed=... without row seeds: row i gets row_seeds_for(seed, n)[i]
    engine.max_batch = 256
    default = engine.generate(ps, sampling, seed=5)
    assert [c.token_ids for c in default] == [c.token_ids for c in engine.generate(ps, sampling, seed=0,
                                                                                    row_seeds=row_seeds_for(5, 3))]
    # it really samples: other seeds give other completions
    others = [engine.generate(ps, sampling, seed=0, row_seeds=[s + k for s in seeds]) for k in range(1, 4)]
    assert any([c.token_ids for c in o] != batch for o in others)


def test_gumbel_max_samples_the_filtered_softmax():
    """The sampler's per-row Gumbel-max draws follow softmax(logits / T) restricted to the top-k / top-p set."""
    from oel_hpc.engines.hf import RowSeededSampler

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 20000
    sampler = RowSeededSampler(list(range(n)), temperature=0.7, top_k=4, top_p=1.0, device="cpu")
    draws = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1)).argmax(-1)
    counts = torch.bincount(draws, minlength=6).double() / n
    expected = torch.softmax(logits[0, :4] / 0.7, -1).double()
    assert counts[4:].sum() == 0  # outside the top-k: never
    assert torch.allclose(counts[:4], expected, atol=0.015), (counts, expected)
    sampler = RowSeededSampler(list(range(n)), temperature=1.0, top_k=0, top_p=0.5, device="cpu")
    draws = sampler(torch.zeros(n, 1, dtype=torch.long), logits.expand(n, -1)).argmax(-1)
    p = torch.softmax(logits[0], -1)
    assert p[0] >= 0.5 and set(draws.tolist()) == {0}  # the top token alone already holds half the mass


def test_max_batch_splits_calls_without_changing_greedy_results(random_model_dir):
    engine = HFEngine.load(str(random_model_dir), device="cpu")
    ps = prompts(engine)
    whole = engine.generate(ps, GREEDY, seed=0)
    engine.max_batch = 1
    assert [c.token_ids for c in engine.generate(ps, GREEDY, seed=0)] == [c.token_ids for c in whole]


def test_response_hidden_feeds_the_loss_at_the_right_positions(random_model_dir):
    """Loss from gathered hidden states == reference loss from the full logits at the response positions."""
    engine = HFEngine.load(str(random_model_dir), device="cpu")
    student = engine.model
    torch.manual_seed(1)
    teacher = type(student)(student.config).eval()  # another model: a non-zero KL
    seqs = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17, 18, 19, 20, 21]]
    lens = [2, 1, 4]
    hs = response_hidden(student, seqs, lens, engine.pad_token_id)
    with torch.no_grad():
        ht = response_hidden(teacher, seqs, lens, engine.pad_token_id)
    out = topk_reverse_kl(hs, student.lm_head.weight, ht, teacher.lm_head.weight, k=7, temperature=0.7, chunk_size=3)
    ref = []
    for s, n in zip(seqs, lens):
        ids = torch.tensor([s])
        ls, lt = student(ids).logits[0], teacher(ids).logits[0]
        # token s[p] is predicted from position p - 1
        pos = torch.arange(len(s) - n - 1, len(s) - 1)
        ref.append((ls[pos], lt[pos].detach()))
    s_logits = torch.cat([r[0] for r in ref])[None]
    t_logits = torch.cat([r[1] for r in ref])[None]
    expected = topk_reverse_kl_reference(s_logits, t_logits, torch.ones(1, sum(lens), dtype=torch.bool), k=7,
                                         temperature=0.7)
    assert out.tokens == sum(lens)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_micro_batches_respect_the_token_budget():
    samples = [Sample([0] * n, [0] * (n + 3), 1) for n in (5, 9, 2, 20, 4)]
    batches = micro_batches(samples, 24)
    assert [len(b) for b in batches] == [2, 1, 1, 1]  # 2 × 12 = 24 fits, then 23 alone, ...
    assert sum(batches, []) == samples
    for b in batches:
        assert len(b) == 1 or len(b) * max(len(s.teacher_ids) for s in b) <= 24
