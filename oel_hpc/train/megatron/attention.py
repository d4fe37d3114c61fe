"""Core attention for megatron-core's local layer spec on ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's stock ``DotProductAttention`` materialises the [b, heads, s, s] score matrix (baddbmm + softmax + bmm);
``SDPAttention`` hands the same computation to PyTorch SDPA (flash / memory-efficient kernels on GPU), with the same
constructor and forward signatures, so it drops into ``get_gpt_layer_local_spec(...)``'s ``core_attention`` slot
(``oel_hpc.train.megatron.model.layer_spec("sdpa")`` does that).

Supported: self-attention with a causal mask (``AttnMaskType.causal``), ``attention_mask=None`` (the mask is
implied), equal query and key lengths, GQA (``num_query_groups`` < heads), no context parallelism, no packed
sequences, no attention bias, no sliding window, vanilla softmax. Everything else raises. Right-padded batches are
fine with a pure causal mask as long as only positions inside each real sequence are read.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide


class SDPAttention(MegatronModule):
    """Drop-in for megatron's ``DotProductAttention`` (causal only) calling PyTorch SDPA.

    Inputs are megatron's ``[s, b, heads_local, head_dim]`` (key/value with ``groups_local`` heads); the output is
    ``[s, b, heads_local * head_dim]``. GQA uses SDPA's ``enable_gqa`` for fp16/bf16 CUDA tensors (the flash kernel
    handles grouped heads natively) and ``repeat_interleave`` of key/value otherwise (so fp32 and CPU keep the fused
    memory-efficient / math kernels that do not take ``enable_gqa``).
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
    ):
        super().__init__(config=config)
        self.config: TransformerConfig = config
        if config.context_parallel_size != 1:
            raise NotImplementedError("SDPAttention: context parallelism is not supported "
                                      f"(context_parallel_size={config.context_parallel_size})")
        if attention_type != "self":
            raise NotImplementedError(f"SDPAttention: attention_type={attention_type!r} (only 'self')")
        if attn_mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"SDPAttention: attn_mask_type={attn_mask_type} (only AttnMaskType.causal)")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            raise NotImplementedError(f"SDPAttention: sliding-window attention (window_size={config.window_size})")
        if config.softmax_type != "vanilla":
            raise NotImplementedError(f"SDPAttention: softmax_type={config.softmax_type!r} (only 'vanilla')")

        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        world_size = pg_collection.tp.size()
        projection_size = config.kv_channels * config.num_attention_heads
        self.hidden_size_per_partition = divide(projection_size, world_size)
        self.hidden_size_per_attention_head = divide(projection_size, config.num_attention_heads)
        self.num_attention_heads_per_partition = divide(config.num_attention_heads, world_size)
        # Megatron's stock module scales by 1/layer_number and multiplies back in the softmax when
        # apply_query_key_layer_scaling is on: the net scale is the same, so only softmax_scale matters here.
        self.softmax_scale = (1.0 / math.sqrt(self.hidden_size_per_attention_head)
                              if softmax_scale is None else softmax_scale)
        self.dropout_p = float(config.attention_dropout if attention_dropout is None else attention_dropout)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("SDPAttention: packed sequences (packed_seq_params) are not supported")
        if attention_bias is not None:
            raise NotImplementedError("SDPAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type != AttnMaskType.causal:
            raise NotImplementedError(f"SDPAttention: attn_mask_type={mask_type} (only AttnMaskType.causal)")
        if attention_mask is not None:
            raise NotImplementedError("SDPAttention: pass attention_mask=None (the causal mask is implied; padding "
                                      "or custom masks are not supported)")
        sq, b, heads, dim = query.shape
        sk, _, groups, _ = key.shape
        if sq != sk:
            raise NotImplementedError(f"SDPAttention: query length {sq} != key length {sk} (no KV-cache decoding)")
        if heads % groups:
            raise ValueError(f"SDPAttention: {heads} query heads are not a multiple of {groups} key/value heads")

        # [s, b, n, d] -> [b, n, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        extra = {}
        if heads != groups:
            if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
                extra["enable_gqa"] = True
            else:
                k = k.repeat_interleave(heads // groups, dim=1)
                v = v.repeat_interleave(heads // groups, dim=1)
        dropout_p = self.dropout_p if self.training else 0.0
        if dropout_p > 0.0 and not self.config.sequence_parallel:
            # as the stock module: dropout under the model-parallel RNG state (different per TP rank)
            with tensor_parallel.get_cuda_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                                     scale=self.softmax_scale, **extra)
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                                 scale=self.softmax_scale, **extra)
        # [b, n, s, d] -> [s, b, n*d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, heads * dim)
