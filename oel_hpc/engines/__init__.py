"""Generation engines behind one interface (`chat_ids`, `count_chat_tokens`, `count_tokens`, `generate`):
`hf` (transformers generate) and `vllm` (vLLM offline inference).

Chosen by `engine.name`; heavy imports happen only when an engine is built.
"""
from __future__ import annotations

from typing import Optional

from oel_hpc.engines.base import Completion  # noqa: F401  (the engines' result type)
from oel_hpc.errors import ConfigError


def build_engine(engine_cfg, model_path: str, *, dtype: str, device: str, thinking: bool,
                 context: Optional[int] = None):
    """`context`: the longest prompt plus answer the run may need (vLLM sizes its sequences by it)."""
    if engine_cfg.name == "hf":
        from oel_hpc.engines.hf import HFEngine

        return HFEngine.load(model_path, dtype=dtype, device=device, max_batch=engine_cfg.max_batch,
                             thinking=thinking)
    if engine_cfg.name == "vllm":
        from oel_hpc.engines.vllm_engine import VLLMEngine

        return VLLMEngine.load(model_path, dtype=dtype, max_batch=engine_cfg.max_batch, thinking=thinking,
                               options=engine_cfg.vllm, tensor_parallel=engine_cfg.vllm.tensor_parallel,
                               context=context)
    raise ConfigError("engine.name", f"unknown engine '{engine_cfg.name}'")
