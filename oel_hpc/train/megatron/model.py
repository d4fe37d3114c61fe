"""Qwen3 (dense) and Llama Hugging Face configs as megatron-core ``GPTModel``s, tensor-parallel, no pipeline or
sequence parallelism.

The caller initialises ``torch.distributed`` and ``megatron.core.parallel_state.initialize_model_parallel(
tensor_model_parallel_size=tp)`` first (on GPU also ``tensor_parallel.model_parallel_cuda_manual_seed(seed)``);
then::

    model = build_gpt(hf_config, tp=tp, dtype=torch.bfloat16, cpu=False)  # on the current CUDA device
    load_hf(model, hf_state, hf_config, tp_rank, tp)        # oel_hpc.train.megatron.convert
    h = final_hidden(model, input_ids, allreduce_grad=True)  # [b, s, hidden], same on every TP rank
    logits_shard = h @ output_weight(model).t()              # [b, s, Vp/tp]: this rank's vocabulary columns
    loss(...).backward(); finalize_grads(model, tp_group)    # then the optimizer step

Gradient convention: the hidden states feed every TP rank's replica of the decoder, while each rank's logits only
cover its vocabulary shard, so the gradient w.r.t. the hidden states must be summed over the TP group somewhere
(megatron's ColumnParallelLinear LM head does it in its backward). ``final_hidden`` does NOT do it by default,
because the project's vocab-parallel loss (``oel_hpc.train.loss.vocab_parallel``) all-reduces that gradient itself.
A caller that multiplies by ``output_weight`` with plain torch ops (as above) must ask for it:
``final_hidden(model, ids, allreduce_grad=True)`` (or ``copy_to_tp_region(h, group)``). Summing twice (both) or
never gives wrong gradients for everything below the LM head.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from oel_hpc.train.megatron.attention import SDPAttention
from oel_hpc.train.megatron.convert import arch, check_tp, padded_vocab_size, unwrap

__all__ = ["padded_vocab_size", "transformer_config", "layer_spec", "build_gpt", "final_hidden", "output_weight",
           "finalize_grads", "tp_partial_grad_params", "copy_to_tp_region", "have_transformer_engine",
           "ATTENTION_CHOICES"]

ATTENTION_CHOICES = ("auto", "sdpa", "te", "local")


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:
        return False
    return True


def transformer_config(hf_config, *, tp: int, dtype: torch.dtype, cpu: bool) -> TransformerConfig:
    """The megatron ``TransformerConfig`` of a Qwen3/Llama HF config split over ``tp`` ranks, parameters in
    ``dtype`` (bf16/fp16 also set megatron's ``bf16``/``fp16`` flags). ``cpu=True`` creates the weights on the CPU
    (``use_cpu_initialization``). Dropout is 0 and every fusion is off (they need CUDA/Apex/TE, and are not where the
    time goes with SDPA attention). Unsupported HF features raise ``ValueError`` naming the field."""
    a = arch(hf_config)
    check_tp(a, tp)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype={dtype} is not supported (float32, bfloat16 or float16)")
    return TransformerConfig(
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        ffn_hidden_size=a.ffn_hidden_size,
        num_attention_heads=a.num_heads,
        num_query_groups=a.num_kv_heads,
        kv_channels=a.head_dim,
        tensor_model_parallel_size=tp,
        sequence_parallel=False,
        normalization="RMSNorm",
        layernorm_epsilon=a.rms_norm_eps,
        qk_layernorm=a.qk_norm,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        rotary_interleaved=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        attention_softmax_in_fp32=True,
        apply_query_key_layer_scaling=False,
        init_method_std=a.initializer_range,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        use_cpu_initialization=cpu,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )


def layer_spec(attention: str = "auto", *, qk_layernorm: bool = False) -> ModuleSpec:
    """The transformer-layer spec for ``attention``:

    - ``"te"``: TransformerEngine spec (fused layernorm+linear, TE attention); error if TE does not import;
    - ``"sdpa"``: megatron's local (pure PyTorch) spec with ``SDPAttention`` as core attention;
    - ``"local"``: megatron's stock local spec (unfused attention that materialises seq x seq scores);
    - ``"auto"``: ``"te"`` if ``transformer_engine`` imports, else ``"sdpa"``.

    The norms are RMSNorm; ``qk_layernorm`` adds Qwen3's per-head q/k RMSNorm.
    """
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention={attention!r}: expected one of {ATTENTION_CHOICES}")
    if attention == "auto":
        attention = "te" if have_transformer_engine() else "sdpa"
    if attention == "te":
        if not have_transformer_engine():
            raise RuntimeError("attention='te' needs TransformerEngine (transformer_engine does not import); "
                               "use attention='sdpa' (or 'auto')")
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    if attention == "sdpa":
        spec = copy.deepcopy(spec)
        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_gpt(hf_config, *, tp: int, dtype: torch.dtype = torch.float32, attention: str = "auto",
              cpu: bool) -> GPTModel:
    """A randomly initialised megatron ``GPTModel`` for this TP rank with the architecture of ``hf_config`` (load
    the weights with ``oel_hpc.train.megatron.convert.load_hf``). Needs ``initialize_model_parallel(
    tensor_model_parallel_size=tp)`` done. Vocabulary padded to ``padded_vocab_size(vocab_size, tp)``; embeddings
    tied iff ``tie_word_embeddings``; RoPE base from ``rope_parameters["rope_theta"]``. Every parameter is in
    ``dtype`` (norms included); ``cpu=True`` creates the weights on the CPU, otherwise on the current CUDA device
    (then seed megatron's RNG tracker first with ``tensor_parallel.model_parallel_cuda_manual_seed``)."""
    a = arch(hf_config)
    if parallel_state.model_parallel_is_initialized():
        world = parallel_state.get_tensor_model_parallel_world_size()
        if world != tp:
            raise ValueError(f"tp={tp} but megatron's tensor-model-parallel world size is {world}")
        if parallel_state.get_pipeline_model_parallel_world_size() != 1:
            raise ValueError("pipeline parallelism is not supported")
    else:
        raise RuntimeError("call megatron.core.parallel_state.initialize_model_parallel(tensor_model_parallel_size="
                           f"{tp}) before build_gpt")
    config = transformer_config(hf_config, tp=tp, dtype=dtype, cpu=cpu)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(attention, qk_layernorm=a.qk_norm),
        vocab_size=padded_vocab_size(a.vocab_size, tp),
        max_sequence_length=a.max_position_embeddings,
        pre_process=True,
        post_process=True,
        parallel_output=True,
        share_embeddings_and_output_weights=a.tied,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=a.rope_theta,
    )
    if dtype != torch.float32:
        # megatron's local norms (torch.nn.RMSNorm via WrappedTorchNorm) ignore params_dtype and are created in fp32
        # (megatron normally casts the whole model with Float16Module); cast them as HF keeps norms in the model dtype
        model.to(dtype=dtype)
    return model


class _CopyToTensorParallel(torch.autograd.Function):
    """Identity forward; backward all-reduces (SUM) the gradient over the TP group."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


def copy_to_tp_region(x: torch.Tensor, group=None) -> torch.Tensor:
    """Identity forward, all-reduce (SUM) of the gradient over the TP group backward (``group`` defaults to
    megatron's TP group). Megatron's ``copy_to_tensor_model_parallel_region`` means the same but all-reduces
    ``grad.contiguous()`` and returns the original gradient: when the gradient arriving there is not contiguous
    (the caller transposed, sliced or chunked the tensor) the reduction is silently lost. This one always reduces."""
    if group is None:
        group = parallel_state.get_tensor_model_parallel_group()
    if group.size() == 1:
        return x
    return _CopyToTensorParallel.apply(x, group)


def final_hidden(model, input_ids: torch.Tensor, *, allreduce_grad: bool = False) -> torch.Tensor:
    """The final-normed hidden states ``[b, s, hidden]`` for ``input_ids`` ``[b, s]`` (what the LM head multiplies),
    causal attention, position ids ``0..s-1``, no padding mask; identical on every TP rank.

    Runs embedding -> rotary table -> decoder (whose last step is the final norm) and skips the output layer.
    ``allreduce_grad=True`` passes the result through ``copy_to_tp_region`` (gradient summed over the TP group in
    backward): needed when the loss is computed from this rank's logits shard with plain torch ops, wrong with a
    loss that reduces the hidden-state gradient itself such as ``loss.vocab_parallel`` (see the module doc)."""
    model = unwrap(model)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    if model.config.sequence_parallel:
        raise ValueError("final_hidden does not support sequence parallelism")
    b, s = input_ids.shape
    position_ids = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
    hidden = model.embedding(input_ids=input_ids, position_ids=position_ids)  # [s, b, h]
    rotary = model.rotary_pos_emb(s)
    hidden = model.decoder(hidden_states=hidden, attention_mask=None, rotary_pos_emb=rotary)  # [s, b, h]
    hidden = hidden.transpose(0, 1)
    if allreduce_grad:
        hidden = copy_to_tp_region(hidden, model.pg_collection.tp)
    return hidden


def output_weight(model) -> torch.Tensor:
    """This TP rank's vocabulary shard of the LM-head weight, ``[Vp/tp, hidden]`` (rank r: padded-vocabulary rows
    ``[r*Vp/tp, (r+1)*Vp/tp)``); the embedding weight itself when embeddings are tied."""
    model = unwrap(model)
    if model.share_embeddings_and_output_weights:
        return model.embedding.word_embeddings.weight
    return model.output_layer.weight


def _grad_attr(param) -> str:
    return "main_grad" if getattr(param, "main_grad", None) is not None else "grad"


def tp_partial_grad_params(model) -> list[tuple[str, torch.nn.Parameter]]:
    """The replicated parameters whose gradient is only a partial sum on each TP rank: Qwen3's per-head q/k
    RMSNorm weights (shared by all heads, while each rank computes only its own heads). Every other replicated
    parameter (input/pre-MLP/final norms) sits in front of a column-parallel layer or of the LM head's hidden-state
    gradient all-reduce (``final_hidden(allreduce_grad=True)`` or the vocab-parallel loss), so its gradient is
    complete."""
    out = []
    for name, param in unwrap(model).named_parameters():
        if getattr(param, "tensor_model_parallel", False):
            continue
        if ".q_layernorm." in name or ".k_layernorm." in name:
            out.append((name, param))
    return out


def finalize_grads(model, tp_group=None) -> None:
    """Make gradients exact for an optimizer step at TP>1: all-reduce (SUM) over ``tp_group`` the gradients of
    ``tp_partial_grad_params`` (one flattened collective; ``main_grad`` used when megatron's DDP keeps one). No-op
    at TP=1. Call after backward, before clipping/stepping (and after any data-parallel reduction, or before it:
    the two commute)."""
    import torch.distributed as dist

    if tp_group is None:
        tp_group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) == 1:
        return
    grads = []
    for _, param in tp_partial_grad_params(model):
        grad = getattr(param, _grad_attr(param))
        if grad is not None:
            grads.append(grad)
    if not grads:
        return
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=tp_group)
    for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        grad.copy_(reduced)
