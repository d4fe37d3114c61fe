"""trainer=megatron: the consolidation backend on megatron-core (``trainer.py``, its optimizers in ``optimizer.py``),
Qwen3 (dense) and Llama HF models as tensor-parallel megatron ``GPTModel``s.

- ``oel_hpc.train.megatron.model``: ``build_gpt``, ``transformer_config``, ``layer_spec``
  ("auto"/"sdpa"/"te"/"local"), ``final_hidden``, ``output_weight``, ``finalize_grads``, ``padded_vocab_size``;
- ``oel_hpc.train.megatron.convert``: exact HF <-> megatron weight conversion for any TP size (``hf_to_megatron``,
  ``megatron_to_hf``, ``load_hf``, ``gather_hf_state``) and the checkpoint key of a TP shard (``shard_key``);
- ``oel_hpc.train.megatron.attention``: ``SDPAttention``, megatron core attention on PyTorch SDPA.

Importing this package does not import megatron (the ``model`` and ``attention`` sub-modules do). On CPU, megatron
needs test-only shims (``tests/megatron_support``); none are in this package.
"""
