"""megatron-core backend: HF <-> megatron conversion, logits and gradient parity at TP=1 and TP=2, SDPA attention.

Multi-rank checks run once per module in a 2-process gloo job (`torchrun --standalone --nproc_per_node 2` on this
file, which gets the CPU shims through tests/megatron_support/sitecustomize.py); the tests then compare what the job
saved with Hugging Face references computed here.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SUPPORT = ROOT / "tests" / "megatron_support"
TINY_ASSET = ROOT / "oel_hpc" / "assets" / "tiny-qwen3"

if __name__ != "__main__" and importlib.util.find_spec("megatron") is None:
    pytest.skip("megatron-core is not installed (pip install -e '.[megatron]')", allow_module_level=True)

CASES = ("qwen3_tied", "qwen3_untied", "llama", "tiny_asset")
ATTENTIONS = ("sdpa", "local")
BATCH, SEQ = 2, 9
LOGIT_ATOL = 1e-5


# ------------------------------------------------------------------------------------------------ HF models
def _hf_case(name: str):
    """(config, HF model) of a test case; synthetic weights are scaled up (peaked attention) and every norm weight
    is random, so that a mix-up of heads, groups or norms shows in the logits."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(CASES.index(name))
    small = dict(vocab_size=251, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, intermediate_size=96, max_position_embeddings=128, initializer_range=0.15,
                 rms_norm_eps=1e-6)
    if name == "qwen3_tied":
        model = Qwen3ForCausalLM(Qwen3Config(**small, tie_word_embeddings=True))
    elif name == "qwen3_untied":
        model = Qwen3ForCausalLM(Qwen3Config(**small, tie_word_embeddings=False,
                                             rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    elif name == "llama":
        model = LlamaForCausalLM(LlamaConfig(**small, tie_word_embeddings=False,
                                             rope_parameters={"rope_type": "default", "rope_theta": 5e5}))
    elif name == "tiny_asset":
        return AutoModelForCausalLM.from_pretrained(TINY_ASSET, dtype=torch.float32).eval()
    else:
        raise KeyError(name)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(0.5, 1.5)
    return model.eval()


def _inputs(name: str, vocab: int):
    g = torch.Generator().manual_seed(100 + CASES.index(name))
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    weights = torch.randn(BATCH, SEQ, vocab, generator=g)  # loss = sum(logits * weights)
    return ids, weights


@pytest.fixture(scope="module")
def hf_cases():
    out = {}
    for name in CASES:
        model = _hf_case(name)
        out[name] = (model.config, model)
    return out


@pytest.fixture(scope="module")
def hf_reference(hf_cases):
    """HF logits and HF gradients of loss = sum(logits * weights) per case."""
    ref = {}
    for name, (config, model) in hf_cases.items():
        ids, weights = _inputs(name, config.vocab_size)
        model.zero_grad(set_to_none=True)
        logits = model(ids).logits
        (logits * weights).sum().backward()
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        ref[name] = {"logits": logits.detach(), "grads": grads}
        model.zero_grad(set_to_none=True)
    return ref


@pytest.fixture
def shimmed():
    """The CPU shims in this process (megatron imported lazily by the test)."""
    sys.path.insert(0, str(SUPPORT))
    try:
        import shims
    finally:
        sys.path.remove(str(SUPPORT))
    shims.install()
    yield shims
    shims.uninstall()


@pytest.fixture(scope="module")
def mp_results(hf_cases, tmp_path_factory):
    """Runs the 2-rank gloo job over every case, attention and TP size; returns what rank 0 saved."""
    work = tmp_path_factory.mktemp("megatron_mp")
    torch.save({name: {"config": config, "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
                for name, (config, model) in hf_cases.items()}, work / "cases.pt")
    env = dict(os.environ, OMP_NUM_THREADS="1", OEL_MEGATRON_CPU_SHIMS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(SUPPORT), str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(work)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"2-rank megatron job failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return torch.load(work / "results.pt", weights_only=False)


# ------------------------------------------------------------------------------------------------ conversion
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_conversion_round_trip_is_exact(hf_cases, name, tp):
    from oel_hpc.train.megatron.convert import hf_to_megatron, megatron_to_hf, padded_vocab_size

    config, model = hf_cases[name]
    state = model.state_dict()
    shards = [hf_to_megatron(state, config, tp_rank=r, tp_size=tp) for r in range(tp)]
    vp = padded_vocab_size(config.vocab_size, tp)
    assert vp % (128 * tp) == 0 and vp >= config.vocab_size
    for shard in shards:
        emb = shard["embedding.word_embeddings.weight"]
        assert emb.shape == (vp // tp, config.hidden_size)
        assert ("output_layer.weight" in shard) == (not config.tie_word_embeddings)
    assert shards[-1]["embedding.word_embeddings.weight"][-(vp - config.vocab_size):].abs().sum() == 0
    back = megatron_to_hf(shards, config)
    expected = {k: v for k, v in state.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    assert set(back) == set(expected)
    for k, v in expected.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    if config.tie_word_embeddings:
        alias = megatron_to_hf(shards, config, include_tied_lm_head=True)
        assert alias["lm_head.weight"] is alias["model.embed_tokens.weight"]


def test_conversion_qkv_layout_is_group_interleaved(hf_cases):
    """Rank r's fused QKV = [q heads of its groups, k, v] per group, groups split across ranks."""
    from oel_hpc.train.megatron.convert import hf_to_megatron

    config, model = hf_cases["qwen3_untied"]  # 4 heads, 2 groups, head_dim 16
    state = model.state_dict()
    q, k, v = (state[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv")
    for rank in range(2):  # one group per rank
        shard = hf_to_megatron(state, config, tp_rank=rank, tp_size=2)
        qkv = shard["decoder.layers.0.self_attention.linear_qkv.weight"]
        expected = torch.cat([q[rank * 32:(rank + 1) * 32], k[rank * 16:(rank + 1) * 16], v[rank * 16:(rank + 1) * 16]])
        assert torch.equal(qkv, expected)
        fc1 = shard["decoder.layers.0.mlp.linear_fc1.weight"]
        gate, up = state["model.layers.0.mlp.gate_proj.weight"], state["model.layers.0.mlp.up_proj.weight"]
        assert torch.equal(fc1, torch.cat([gate[rank * 48:(rank + 1) * 48], up[rank * 48:(rank + 1) * 48]]))


def test_conversion_errors(hf_cases):
    from transformers import Qwen3Config

    from oel_hpc.train.megatron.convert import arch, hf_to_megatron

    config, model = hf_cases["qwen3_tied"]
    state = dict(model.state_dict())
    with pytest.raises(ValueError, match="tp=3"):
        hf_to_megatron(state, config, tp_rank=0, tp_size=3)
    with pytest.raises(KeyError, match="model.norm.weight"):
        hf_to_megatron({k: v for k, v in state.items() if k != "model.norm.weight"}, config, tp_rank=0, tp_size=1)
    with pytest.raises(ValueError, match="does not know"):
        hf_to_megatron({**state, "model.extra.weight": torch.zeros(1)}, config, tp_rank=0, tp_size=1)
    base = dict(vocab_size=251, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, intermediate_size=96)
    bad = {
        "use_sliding_window": Qwen3Config(**base, use_sliding_window=True, sliding_window=8),
        "rope_type": Qwen3Config(**base, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
        "attention_bias": Qwen3Config(**base, attention_bias=True),
        "hidden_act": Qwen3Config(**base, hidden_act="gelu"),
    }
    for field, cfg in bad.items():
        with pytest.raises(ValueError, match=field):
            arch(cfg)
    moe = Qwen3Config(**base)
    moe.model_type = "qwen3_moe"
    with pytest.raises(ValueError, match="model_type"):
        arch(moe)
    assert arch(config).rope_theta == config.rope_parameters["rope_theta"]


def test_import_does_not_import_megatron():
    code = "import sys, oel_hpc.train.megatron, oel_hpc.train.megatron.convert; assert 'megatron' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_sitecustomize_is_inert_without_the_variable():
    env = dict(os.environ, PYTHONPATH=str(SUPPORT))
    env.pop("OEL_MEGATRON_CPU_SHIMS", None)
    code = ("import sys, sitecustomize; assert sitecustomize.__file__.startswith(sys.argv[1]), sitecustomize.__file__;"
            "assert 'torch' not in sys.modules and 'megatron' not in sys.modules")
    subprocess.run([sys.executable, "-c", code, str(SUPPORT)], check=True, cwd=ROOT, env=env)


def test_layer_spec_choices(shimmed):
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from oel_hpc.train.megatron.attention import SDPAttention
    from oel_hpc.train.megatron.model import have_transformer_engine, layer_spec

    def core(spec):
        return spec.submodules.self_attention.submodules.core_attention

    assert core(layer_spec("sdpa", qk_layernorm=True)) is SDPAttention
    assert core(layer_spec("local")) is DotProductAttention
    assert core(layer_spec("sdpa")) is SDPAttention and core(layer_spec("local")) is DotProductAttention  # no leak
    if not have_transformer_engine():
        assert core(layer_spec("auto")) is SDPAttention
        with pytest.raises(RuntimeError, match="TransformerEngine"):
            layer_spec("te")
    with pytest.raises(ValueError, match="attention="):
        layer_spec("flash")


# ------------------------------------------------------------------------------------------------ multi-rank
@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("tp", [1, 2])
def test_logits_match_hf(mp_results, hf_reference, name, attention, tp):
    got = mp_results["runs"][(tp, name, attention)]["logits"]
    ref = hf_reference[name]["logits"]
    assert got.shape == ref.shape
    assert ref.abs().max() > 0.5  # the check is not vacuous
    assert (got - ref).abs().max().item() < LOGIT_ATOL


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_tp2_gradients_equal_tp1_after_finalize(mp_results, hf_reference, name, attention):
    tp1 = mp_results["runs"][(1, name, attention)]["grads"]
    tp2 = mp_results["runs"][(2, name, attention)]["grads"]
    hf = hf_reference[name]["grads"]
    assert set(tp1) == set(tp2)
    for k in tp1:
        scale = tp1[k].abs().max().item() + 1e-12
        assert (tp2[k] - tp1[k]).abs().max().item() <= 1e-5 * max(1.0, scale), k
        assert (tp1[k] - hf[k]).abs().max().item() <= 1e-4 * max(1.0, scale), k  # and both match HF


@pytest.mark.parametrize("name", ["qwen3_tied", "llama"])
def test_finalize_grads_reduces_exactly_the_partial_grads(mp_results, name):
    """Before finalize_grads, TP=2's q/k-norm gradients are partial (each rank has half the heads) while every
    other replicated parameter's gradient already equals TP=1's; finalize_grads reduces only the former."""
    run1, run2 = mp_results["runs"][(1, name, "sdpa")], mp_results["runs"][(2, name, "sdpa")]
    tp1, before, partial_names = run1["grads"], run2["grads_before_finalize"], run2["partial_grad_params"]
    replicated = [k for k in tp1 if "norm" in k]
    qk = [k for k in replicated if "q_norm" in k or "k_norm" in k]
    assert (len(qk) > 0) == (name == "qwen3_tied")
    assert sorted(partial_names) == sorted(
        f"decoder.layers.{i}.self_attention.{x}_layernorm.weight" for i in range(2) for x in "qk" if qk)
    for k in replicated:
        rel = (before[k] - tp1[k]).abs().max().item() / max(1.0, tp1[k].abs().max().item())
        if k in qk:
            assert rel > 1e-2, k  # partial on each rank: finalize_grads must sum it
        else:
            assert rel < 1e-5, k  # already complete: summing it would double it


def test_hidden_states_identical_on_tp_ranks(mp_results):
    assert mp_results["hidden_rank_diff"] == 0.0


def test_gather_hf_state_returns_the_loaded_weights(mp_results):
    for key, diff in mp_results["gather_diff"].items():
        assert diff == 0.0, key


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_attention_equals_stock_local_attention(mp_results, tp):
    fwd, grad = mp_results["attention_diff"][tp]  # relative to the largest magnitude
    assert fwd < 1e-6 and grad < 1e-5


@pytest.mark.parametrize("tp", [1, 2])
def test_bf16_model(mp_results, hf_cases, tp):
    got = mp_results["bf16"][tp]
    assert got["dtypes"] == ["torch.bfloat16"] and got["grad_dtypes"] == ["torch.bfloat16"]
    _, model = hf_cases["tiny_asset"]
    ids, _ = _inputs("tiny_asset", model.config.vocab_size)
    with torch.no_grad():
        ref = copy.deepcopy(model).to(torch.bfloat16)(ids).logits.float()
    assert (got["logits"] - ref).abs().max().item() < 0.03 * ref.abs().max().item()


# ------------------------------------------------------------------------------------------------ the 2-rank job
def _gather_dict(d: dict, group) -> list[dict]:
    import torch.distributed as dist

    world = dist.get_world_size(group)
    out = [{} for _ in range(world)]
    for k, v in d.items():
        parts = [torch.empty_like(v) for _ in range(world)]
        dist.all_gather(parts, v.contiguous(), group=group)
        for r in range(world):
            out[r][k] = parts[r]
    return out


def _attention_check(tp: int, tp_rank: int) -> tuple[float, float]:
    """SDPAttention vs megatron's DotProductAttention on this rank's heads (GQA: 4 heads, 2 groups in total)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType
    from transformers import Qwen3Config

    from oel_hpc.train.megatron.attention import SDPAttention
    from oel_hpc.train.megatron.model import transformer_config

    cfg = transformer_config(Qwen3Config(vocab_size=251, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, head_dim=16, intermediate_size=96),
                             tp=tp, dtype=torch.float32, cpu=True)
    kw = dict(config=cfg, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    ours, stock = SDPAttention(**kw), DotProductAttention(**kw)
    g = torch.Generator().manual_seed(7 + tp_rank)
    s, b, heads, groups = 11, 3, 4 // tp, 2 // tp
    q = (2 * torch.randn(s, b, heads, 16, generator=g)).requires_grad_()
    k = (2 * torch.randn(s, b, groups, 16, generator=g)).requires_grad_()
    v = torch.randn(s, b, groups, 16, generator=g).requires_grad_()
    out_ref = stock(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    grads_ref = torch.autograd.grad((out_ref * out_ref).sum(), (q, k, v))
    out = ours(q, k, v, None, attn_mask_type=AttnMaskType.causal)
    grads = torch.autograd.grad((out * out).sum(), (q, k, v))
    assert out.shape == (s, b, heads * 16)
    # errors relative to the largest magnitude of each tensor
    return ((out - out_ref).abs().max().item() / out_ref.abs().max().item(),
            max((a - r).abs().max().item() / r.abs().max().item() for a, r in zip(grads, grads_ref)))


def _worker(work: Path) -> None:
    import torch.distributed as dist

    assert torch.cuda.current_device() == torch.device("cpu"), "sitecustomize did not install the CPU shims"
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    from megatron.core import parallel_state

    from oel_hpc.train.megatron.convert import gather_hf_state, load_hf, megatron_to_hf, padded_vocab_size
    from oel_hpc.train.megatron.model import (
        build_gpt,
        copy_to_tp_region,
        final_hidden,
        finalize_grads,
        output_weight,
        tp_partial_grad_params,
    )

    cases = torch.load(work / "cases.pt", weights_only=False)
    results = {"runs": {}, "gather_diff": {}, "attention_diff": {}, "hidden_rank_diff": 0.0, "bf16": {}}
    for tp in (1, 2):
        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        group = parallel_state.get_tensor_model_parallel_group()
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        results["attention_diff"][tp] = _attention_check(tp, tp_rank)
        for name, case in cases.items():
            config, state = case["config"], case["state"]
            ids, weights = _inputs(name, config.vocab_size)
            vp = padded_vocab_size(config.vocab_size, tp)
            w_shard = torch.nn.functional.pad(weights, (0, vp - config.vocab_size)).chunk(tp, dim=-1)[tp_rank]
            for attention in ATTENTIONS:
                torch.manual_seed(0)
                model = build_gpt(config, tp=tp, dtype=torch.float32, attention=attention, cpu=True)
                load_hf(model, state, config, tp_rank, tp)
                if attention == "sdpa":
                    gathered = gather_hf_state(model, config, group)
                    ref = {k: v for k, v in state.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
                    assert set(gathered) == set(ref)
                    results["gather_diff"][(tp, name)] = max((gathered[k] - ref[k]).abs().max().item() for k in ref)
                # sdpa runs: final_hidden reduces the hidden-state gradient; local runs: the caller does, on a
                # transposed view (a non-contiguous gradient, which megatron's copy_to region would drop)
                hidden = final_hidden(model, ids, allreduce_grad=attention == "sdpa")
                assert hidden.shape == (BATCH, SEQ, config.hidden_size)
                if tp == 2:
                    both = _gather_dict({"h": hidden.detach()}, group)
                    results["hidden_rank_diff"] = max(results["hidden_rank_diff"],
                                                      (both[0]["h"] - both[1]["h"]).abs().max().item())
                weight = output_weight(model)
                assert weight.shape == (vp // tp, config.hidden_size)
                if attention == "sdpa":
                    logits_shard = hidden @ weight.t()
                else:
                    logits_shard = (copy_to_tp_region(hidden.transpose(0, 1), group) @ weight.t()).transpose(0, 1)
                (logits_shard * w_shard).sum().backward()
                params = dict(model.named_parameters())
                before = {k: p.grad.detach().clone() for k, p in params.items()}
                finalize_grads(model, group)
                after = {k: p.grad.detach().clone() for k, p in params.items()}
                full_logits = torch.cat([d["l"] for d in _gather_dict({"l": logits_shard.detach()}, group)], dim=-1)
                run = {"logits": full_logits[..., :config.vocab_size],
                       "grads": megatron_to_hf(_gather_dict(after, group), config),
                       "grads_before_finalize": megatron_to_hf(_gather_dict(before, group), config),
                       "partial_grad_params": [n for n, _ in tp_partial_grad_params(model)]}
                results["runs"][(tp, name, attention)] = run
        # bf16: every parameter in bf16 (norms included), logits close to HF's bf16 logits
        config, state = cases["tiny_asset"]["config"], cases["tiny_asset"]["state"]
        model = build_gpt(config, tp=tp, dtype=torch.bfloat16, attention="sdpa", cpu=True)
        load_hf(model, {k: v.to(torch.bfloat16) for k, v in state.items()}, config, tp_rank, tp)
        ids, _ = _inputs("tiny_asset", config.vocab_size)
        logits_shard = final_hidden(model, ids, allreduce_grad=True) @ output_weight(model).t()
        logits_shard.float().sum().backward()
        logits = torch.cat([d["l"] for d in _gather_dict({"l": logits_shard.detach()}, group)], dim=-1)
        results["bf16"][tp] = {"dtypes": sorted({str(p.dtype) for p in model.parameters()}),
                               "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters()}),
                               "logits": logits[..., :config.vocab_size].float()}
    if rank == 0:
        torch.save(results, work / "results.pt")
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))


# ------------------------------------------------------------------------------------------------ paper shapes
# Qwen3 dense configs as published on the Hub (config.json), the sizes the recipes use
QWEN3_SHAPES = {
    "0.6B": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=3072, tie_word_embeddings=True),
    "1.7B": dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 intermediate_size=6144, tie_word_embeddings=True),
    "4B": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=9728, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=12288, tie_word_embeddings=False),
}


@pytest.mark.parametrize("size", QWEN3_SHAPES)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_paper_model_shapes_configure_at_every_tp(size, tp):
    from transformers import Qwen3Config

    from oel_hpc.train.megatron.convert import padded_vocab_size
    from oel_hpc.train.megatron.model import transformer_config

    hf = Qwen3Config(vocab_size=151936, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6}, **QWEN3_SHAPES[size])
    c = transformer_config(hf, tp=tp, dtype=torch.bfloat16, cpu=False)
    assert (c.num_layers, c.hidden_size, c.ffn_hidden_size) == (hf.num_hidden_layers, hf.hidden_size,
                                                                hf.intermediate_size)
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (hf.num_attention_heads, 8, 128)
    assert c.qk_layernorm and c.bf16 and c.tensor_model_parallel_size == tp
    assert padded_vocab_size(151936, tp) % (128 * tp) == 0 and padded_vocab_size(151936, tp) >= 151936
