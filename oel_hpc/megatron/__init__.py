"""Megatron-core backend: Qwen3 (dense) and Llama HF models as tensor-parallel megatron ``GPTModel``s.

- ``oel_hpc.megatron.model``: ``build_gpt``, ``transformer_config``, ``layer_spec`` ("auto"/"sdpa"/"te"/"local"),
  ``final_hidden``, ``output_weight``, ``finalize_grads``, ``padded_vocab_size``;
- ``oel_hpc.megatron.convert``: exact HF <-> megatron weight conversion for any TP size (``hf_to_megatron``,
  ``megatron_to_hf``, ``load_hf``, ``gather_hf_state``);
- ``oel_hpc.megatron.attention``: ``SDPAttention``, megatron core attention on PyTorch SDPA.

Importing this package does not import megatron (the ``model`` and ``attention`` sub-modules do). On CPU, megatron
needs test-only shims (``tests/megatron_support``); none are in this package.
"""
