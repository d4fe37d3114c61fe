"""Exact weight conversion between Hugging Face Qwen3/Llama state dicts and megatron-core GPTModel shards.

Megatron layout, per tensor-parallel (TP) rank r of T (keys as in ``GPTModel.state_dict()``, ``_extra_state``
entries left out):

- ``decoder.layers.N.self_attention.linear_qkv.weight``: the fused QKV in megatron's per-query-group interleaved
  order ``[q heads of group 0 (heads_per_group*head_dim rows), k_0, v_0, q of group 1, k_1, v_1, ...]``, cut into T
  equal row blocks (so each rank gets whole groups when ``num_key_value_heads >= T``; megatron also supports
  ``T > num_key_value_heads``, where a group spans several ranks and the same contiguous cut applies: logits and
  gradients were checked against HF at T=4 with 2 KV heads in a one-off run, the test suite runs T=1 and T=2);
- ``mlp.linear_fc1.weight``: ``[gate_r; up_r]``, rank r's rows of gate_proj then rank r's rows of up_proj;
- ``linear_proj`` (o_proj) and ``mlp.linear_fc2`` (down_proj): cut along the input (column) dimension;
- ``embedding.word_embeddings.weight`` and ``output_layer.weight``: zero rows appended up to the padded vocabulary
  ``Vp = padded_vocab_size(V, T)``, then cut into T row blocks (rank r holds rows ``[r*Vp/T, (r+1)*Vp/T)``);
  with tied embeddings there is no ``output_layer.weight``;
- norms (``input_layernorm``, ``pre_mlp_layernorm``, ``q_layernorm``/``k_layernorm``, ``decoder.final_layernorm``)
  replicated. The TransformerEngine layer spec names the fused pre-norms
  ``self_attention.linear_qkv.layer_norm_weight`` and ``mlp.linear_fc1.layer_norm_weight`` instead
  (``fused_norms=True``; ``megatron_to_hf`` detects it from the keys). That name set is written from megatron's spec
  and not run here (no TransformerEngine on CPU).

The same functions convert gradient dicts (same keys and shapes), which is how the tests compare TP=2 with TP=1
gradients. This module does not import megatron (``load_hf``/``gather_hf_state`` only use the given model and
``torch.distributed``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_MODEL_TYPES = ("qwen3", "llama")
VOCAB_PAD_MULTIPLE = 128


def shard_key(tp_rank: int, tp: int) -> str:
    """Where a TP rank's model and optimizer state sit in a trainer=megatron checkpoint (DCP), as the trainer writes
    them and the evaluation export (train/export.py) reads them back without megatron."""
    return f"tp{tp_rank}_of_{tp}"


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary size the megatron model is built with: ``vocab_size`` rounded up to a multiple of ``128*tp``
    (megatron's ``make_vocab_size_divisible_by=128`` rule), so every TP rank holds the same number of rows and the
    row count is GEMM-friendly. The extra rows are zero after ``hf_to_megatron`` and dropped by ``megatron_to_hf``;
    their logits are 0 and must be masked (or sliced away) by whoever uses full-vocabulary logits."""
    if vocab_size <= 0 or tp <= 0:
        raise ValueError(f"padded_vocab_size: vocab_size ({vocab_size}) and tp ({tp}) must be positive")
    multiple = VOCAB_PAD_MULTIPLE * tp
    return -(-vocab_size // multiple) * multiple


@dataclass(frozen=True)
class Arch:
    """The numbers of a supported HF config that the megatron model and the conversion need."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    tied: bool
    qk_norm: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    initializer_range: float

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


def _get(cfg, name, default=None):
    return getattr(cfg, name, default)


def rope_theta(hf_config) -> float:
    """RoPE base: ``rope_parameters["rope_theta"]`` (transformers 5), else the legacy ``rope_theta`` attribute."""
    params = _get(hf_config, "rope_parameters")
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    theta = _get(hf_config, "rope_theta")
    if theta is None:
        raise ValueError("config has neither rope_parameters['rope_theta'] nor rope_theta")
    return float(theta)


def arch(hf_config) -> Arch:
    """Validate ``hf_config`` (Qwen3 dense or Llama) and return its numbers; unsupported features raise
    ``ValueError`` naming the config field."""
    model_type = _get(hf_config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"model_type={model_type!r} is not supported by the megatron backend "
                         f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)}; MoE variants are not)")
    for moe_field in ("num_experts", "num_local_experts", "n_routed_experts"):
        if _get(hf_config, moe_field):
            raise ValueError(f"{moe_field}={_get(hf_config, moe_field)}: mixture-of-experts is not supported")
    act = _get(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r} is not supported (only 'silu', i.e. SwiGLU)")
    if _get(hf_config, "attention_bias", False):
        raise ValueError("attention_bias=True is not supported (megatron's add_qkv_bias does not cover o_proj's "
                         "bias; Qwen3/Llama biases are not converted)")
    if _get(hf_config, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported")
    for params_field in ("rope_parameters", "rope_scaling"):
        params = _get(hf_config, params_field)
        if isinstance(params, dict):
            rope_type = params.get("rope_type", params.get("type", "default"))
            if rope_type not in (None, "default"):
                raise ValueError(f"{params_field}['rope_type']={rope_type!r} is not supported (only default RoPE)")
            if params.get("partial_rotary_factor", 1.0) != 1.0:
                raise ValueError(f"{params_field}['partial_rotary_factor']={params['partial_rotary_factor']} "
                                 "is not supported")
    if _get(hf_config, "partial_rotary_factor", 1.0) not in (None, 1.0):
        raise ValueError(f"partial_rotary_factor={hf_config.partial_rotary_factor} is not supported")
    if _get(hf_config, "use_sliding_window", False):
        raise ValueError("use_sliding_window=True is not supported (full causal attention only)")
    layer_types = _get(hf_config, "layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer_types={list(layer_types)} is not supported (only 'full_attention' layers)")
    if _get(hf_config, "pretraining_tp", 1) not in (None, 1):
        raise ValueError(f"pretraining_tp={hf_config.pretraining_tp} is not supported")

    hidden = int(hf_config.hidden_size)
    heads = int(hf_config.num_attention_heads)
    kv_heads = int(_get(hf_config, "num_key_value_heads") or heads)
    head_dim = _get(hf_config, "head_dim") or hidden // heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    return Arch(
        model_type=model_type, num_layers=int(hf_config.num_hidden_layers), hidden_size=hidden, num_heads=heads,
        num_kv_heads=kv_heads, head_dim=int(head_dim), ffn_hidden_size=int(hf_config.intermediate_size),
        vocab_size=int(hf_config.vocab_size), tied=bool(_get(hf_config, "tie_word_embeddings", False)),
        qk_norm=model_type == "qwen3", rms_norm_eps=float(hf_config.rms_norm_eps), rope_theta=rope_theta(hf_config),
        max_position_embeddings=int(hf_config.max_position_embeddings),
        initializer_range=float(_get(hf_config, "initializer_range", 0.02)))


def check_tp(a: Arch, tp: int) -> None:
    """Raise ``ValueError`` unless the model can be split over ``tp`` tensor-parallel ranks."""
    if tp < 1:
        raise ValueError(f"tp={tp} must be >= 1")
    if a.num_heads % tp:
        raise ValueError(f"num_attention_heads={a.num_heads} is not divisible by tp={tp}")
    if a.num_kv_heads % tp and tp % a.num_kv_heads:
        raise ValueError(f"num_key_value_heads={a.num_kv_heads} and tp={tp}: one must divide the other")
    if a.ffn_hidden_size % tp:
        raise ValueError(f"intermediate_size={a.ffn_hidden_size} is not divisible by tp={tp}")


# ---------------------------------------------------------------------------------------------------------- names
def _hf_layer(i: int) -> dict[str, str]:
    p = f"model.layers.{i}."
    return {"q": p + "self_attn.q_proj.weight", "k": p + "self_attn.k_proj.weight",
            "v": p + "self_attn.v_proj.weight", "o": p + "self_attn.o_proj.weight",
            "q_norm": p + "self_attn.q_norm.weight", "k_norm": p + "self_attn.k_norm.weight",
            "gate": p + "mlp.gate_proj.weight", "up": p + "mlp.up_proj.weight", "down": p + "mlp.down_proj.weight",
            "in_norm": p + "input_layernorm.weight", "post_norm": p + "post_attention_layernorm.weight"}


def _mg_layer(i: int, fused_norms: bool) -> dict[str, str]:
    p = f"decoder.layers.{i}."
    return {"qkv": p + "self_attention.linear_qkv.weight", "proj": p + "self_attention.linear_proj.weight",
            "q_norm": p + "self_attention.q_layernorm.weight", "k_norm": p + "self_attention.k_layernorm.weight",
            "fc1": p + "mlp.linear_fc1.weight", "fc2": p + "mlp.linear_fc2.weight",
            "in_norm": p + ("self_attention.linear_qkv.layer_norm_weight" if fused_norms
                            else "input_layernorm.weight"),
            "post_norm": p + ("mlp.linear_fc1.layer_norm_weight" if fused_norms else "pre_mlp_layernorm.weight")}


EMBED_HF, NORM_HF, LM_HEAD_HF = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
EMBED_MG, NORM_MG, OUTPUT_MG = "embedding.word_embeddings.weight", "decoder.final_layernorm.weight", \
    "output_layer.weight"


def is_extra_state(key: str) -> bool:
    return key.endswith("_extra_state")


def uses_fused_norms(keys) -> bool:
    """Whether megatron state keys come from the TransformerEngine spec (pre-norms fused into the linears)."""
    return any(k.endswith("linear_qkv.layer_norm_weight") for k in keys)


def _take(state: dict, key: str) -> torch.Tensor:
    try:
        return state[key]
    except KeyError:
        raise KeyError(f"HF state dict has no {key!r}") from None


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    if t.shape[0] == rows:
        return t
    return torch.cat([t, t.new_zeros((rows - t.shape[0],) + tuple(t.shape[1:]))], dim=0)


def _chunk(t: torch.Tensor, tp: int, rank: int, dim: int = 0) -> torch.Tensor:
    if t.shape[dim] % tp:
        raise ValueError(f"cannot split a tensor of shape {tuple(t.shape)} into {tp} along dim {dim}")
    return t.chunk(tp, dim=dim)[rank].clone()


# ------------------------------------------------------------------------------------------------ HF -> megatron
def hf_to_megatron(hf_state: dict, hf_config, *, tp_rank: int, tp_size: int, fused_norms: bool = False) -> dict:
    """The state dict (without ``_extra_state`` entries) of TP rank ``tp_rank`` of a megatron GPTModel built by
    ``oel_hpc.train.megatron.model.build_gpt(hf_config, tp=tp_size)``. ``fused_norms=True`` names the pre-norms as the
    TransformerEngine spec does. Raises ``KeyError`` for a missing HF tensor and ``ValueError`` for HF tensors it
    does not know (other than a tied ``lm_head.weight`` and rotary ``inv_freq`` buffers)."""
    a = arch(hf_config)
    check_tp(a, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank={tp_rank} is outside [0, {tp_size})")
    hd, h, g, hpg = a.head_dim, a.hidden_size, a.num_kv_heads, a.heads_per_group
    used = set()

    def take(key):
        used.add(key)
        return _take(hf_state, key)

    out = {}
    vp = padded_vocab_size(a.vocab_size, tp_size)
    out[EMBED_MG] = _chunk(_pad_rows(take(EMBED_HF), vp), tp_size, tp_rank)
    for i in range(a.num_layers):
        hf, mg = _hf_layer(i), _mg_layer(i, fused_norms)
        q = take(hf["q"]).reshape(g, hpg * hd, h)
        k = take(hf["k"]).reshape(g, hd, h)
        v = take(hf["v"]).reshape(g, hd, h)
        out[mg["qkv"]] = _chunk(torch.cat([q, k, v], dim=1).reshape(g * (hpg + 2) * hd, h), tp_size, tp_rank)
        out[mg["proj"]] = _chunk(take(hf["o"]), tp_size, tp_rank, dim=1)
        if a.qk_norm:
            out[mg["q_norm"]] = take(hf["q_norm"]).clone()
            out[mg["k_norm"]] = take(hf["k_norm"]).clone()
        out[mg["in_norm"]] = take(hf["in_norm"]).clone()
        out[mg["post_norm"]] = take(hf["post_norm"]).clone()
        out[mg["fc1"]] = torch.cat([_chunk(take(hf["gate"]), tp_size, tp_rank),
                                    _chunk(take(hf["up"]), tp_size, tp_rank)], dim=0)
        out[mg["fc2"]] = _chunk(take(hf["down"]), tp_size, tp_rank, dim=1)
    out[NORM_MG] = take(NORM_HF).clone()
    if a.tied:
        used.add(LM_HEAD_HF)  # a tied HF state dict may carry the alias; it is the embedding
    else:
        out[OUTPUT_MG] = _chunk(_pad_rows(take(LM_HEAD_HF), vp), tp_size, tp_rank)
    unknown = sorted(k for k in hf_state if k not in used and not k.endswith("rotary_emb.inv_freq"))
    if unknown:
        raise ValueError(f"HF state dict has tensors the conversion does not know: {unknown[:8]}"
                         + (" ..." if len(unknown) > 8 else ""))
    return out


# ------------------------------------------------------------------------------------------------ megatron -> HF
def megatron_to_hf(shards: list[dict], hf_config, *, include_tied_lm_head: bool = False) -> dict:
    """The HF state dict from the state dicts of all TP ranks (``shards[r]`` = rank r; ``_extra_state`` entries
    ignored), vocabulary padding dropped. With tied embeddings there is no ``lm_head.weight`` key (as in a saved HF
    checkpoint) unless ``include_tied_lm_head`` (then it is the same tensor as ``model.embed_tokens.weight``, as in
    ``PreTrainedModel.state_dict()``). Also converts gradient dicts."""
    if not shards:
        raise ValueError("megatron_to_hf: no shards")
    a = arch(hf_config)
    tp = len(shards)
    check_tp(a, tp)
    fused = uses_fused_norms(shards[0].keys())
    hd, h, g, hpg, v = a.head_dim, a.hidden_size, a.num_kv_heads, a.heads_per_group, a.vocab_size

    def get(key, rank=0):
        try:
            return shards[rank][key]
        except KeyError:
            raise KeyError(f"megatron state dict of TP rank {rank} has no {key!r}") from None

    def cat(key, dim=0):
        return torch.cat([get(key, r) for r in range(tp)], dim=dim)

    out = {EMBED_HF: cat(EMBED_MG)[:v].clone()}
    for i in range(a.num_layers):
        hf, mg = _hf_layer(i), _mg_layer(i, fused)
        qkv = cat(mg["qkv"]).reshape(g, (hpg + 2) * hd, h)
        q, k, vv = qkv.split([hpg * hd, hd, hd], dim=1)
        out[hf["q"]] = q.reshape(g * hpg * hd, h).clone()
        out[hf["k"]] = k.reshape(g * hd, h).clone()
        out[hf["v"]] = vv.reshape(g * hd, h).clone()
        out[hf["o"]] = cat(mg["proj"], dim=1)
        if a.qk_norm:
            out[hf["q_norm"]] = get(mg["q_norm"]).clone()
            out[hf["k_norm"]] = get(mg["k_norm"]).clone()
        fc1 = [get(mg["fc1"], r).chunk(2, dim=0) for r in range(tp)]
        out[hf["gate"]] = torch.cat([f[0] for f in fc1], dim=0)
        out[hf["up"]] = torch.cat([f[1] for f in fc1], dim=0)
        out[hf["down"]] = cat(mg["fc2"], dim=1)
        out[hf["in_norm"]] = get(mg["in_norm"]).clone()
        out[hf["post_norm"]] = get(mg["post_norm"]).clone()
    out[NORM_HF] = get(NORM_MG).clone()
    if a.tied:
        if include_tied_lm_head:
            out[LM_HEAD_HF] = out[EMBED_HF]
    else:
        out[LM_HEAD_HF] = cat(OUTPUT_MG)[:v].clone()
    return out


# ---------------------------------------------------------------------------------------------- model helpers
def unwrap(model):
    """The GPTModel inside wrappers that keep it as ``.module`` (megatron DDP, Float16Module, torch DDP)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def load_hf(model, hf_state: dict, hf_config, tp_rank: int, tp_size: int) -> None:
    """Load an HF state dict into this TP rank's GPTModel (strict on every key but ``_extra_state``). Raises
    ``RuntimeError`` listing missing/unexpected keys or mismatched shapes."""
    model = unwrap(model)
    own = {k: v for k, v in model.state_dict().items() if not is_extra_state(k)}
    state = hf_to_megatron(hf_state, hf_config, tp_rank=tp_rank, tp_size=tp_size,
                           fused_norms=uses_fused_norms(own.keys()))
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: model {tuple(own[k].shape)} vs converted {tuple(state[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise RuntimeError("load_hf: the converted state does not match the model "
                           f"(tp_rank={tp_rank}, tp_size={tp_size}): missing {missing}, unexpected {unexpected}, "
                           f"shape mismatches {shapes}")
    result = model.load_state_dict(state, strict=False)
    bad_missing = [k for k in result.missing_keys if not is_extra_state(k)]
    if bad_missing or result.unexpected_keys:
        raise RuntimeError(f"load_hf: missing keys {bad_missing}, unexpected keys {result.unexpected_keys}")


def gather_hf_state(model, hf_config, group=None, values=None) -> dict:
    """All-gather this TP group's shards of ``model`` and return the full HF state dict (CPU tensors) on every rank.
    One ``all_gather`` per tensor on the device the tensor lives on (CPU for gloo, CUDA for NCCL); every TP shard of
    a tensor has the same shape, and ``state_dict()`` lists keys in the same order on every rank. ``values(key,
    tensor)``, when given, supplies each tensor instead (e.g. the float32 master weight of a 16-bit parameter), one
    at a time in that order (it may be a collective)."""
    import torch.distributed as dist

    model = unwrap(model)
    state = {k: v.detach() for k, v in model.state_dict().items() if not is_extra_state(k)}
    value = (lambda k, v: v) if values is None else values
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return megatron_to_hf([{k: value(k, v).cpu() for k, v in state.items()}], hf_config)
    shards = [{} for _ in range(world)]
    for key, tensor in state.items():
        tensor = value(key, tensor).contiguous()
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor, group=group)
        for r in range(world):
            shards[r][key] = parts[r].cpu()
    return megatron_to_hf(shards, hf_config)
