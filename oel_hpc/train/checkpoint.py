"""Training state on disk with torch.distributed.checkpoint (DCP): model and optimizer (sharded by whatever wrote
them), plus step, config hash and RNG; written atomically and found again by scanning the folder.

    ckpt/step_<k>/            one complete checkpoint (the folder appears only by rename)
        .metadata  __<rank>_0.distcp ...   DCP: {"model": ..., "optimizer": ...}, keys as in the HF model
        rng_rank<r>.pt        torch / python / cuda RNG of each rank that wrote it
        meta.json             {step, config_hash, world_size, trainer, ...}: written last, before the rename
        hf/                   (later, once) the model as a Hugging Face folder, made by train/export.py
    ckpt/latest               the newest step, for people (resume never reads it: it scans step_*/meta.json)
    ckpt/.step_<k>.tmp/       a save in progress (a crash leaves it behind; the next save of that step removes it)

A resumed job (crash, requeue) looks for its newest complete checkpoint itself rather than trusting a path it was
given, refuses one written under another config, and may run on another number of ranks than the writer: DCP
reshards on load. One process (no process group) uses the same format.

It knows no backend: what a checkpoint holds comes from the trainer's `checkpoint_state` / `checkpoint_meta`
(train/backend.py), and the backends import this module, never the reverse.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from oel_hpc.errors import NonFiniteWeights
from oel_hpc.log import get_logger
from oel_hpc.rundir import default_modes, make_temp_dir, replace_dir_atomic, write_json_atomic, write_text_atomic
from oel_hpc.train import numerics

META = "meta.json"
log = get_logger(__name__)


def _rng_state() -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save(ckpt_dir: Path, step: int, trainer, stage_hash: str, keep: Optional[int] = None, d=None) -> Path:
    """Every rank calls this (DCP writes each rank's shards): `trainer.checkpoint_state()` (model and optimizer
    under the backend's keys) and its `checkpoint_meta()` into meta.json."""
    rank, world = (d.rank, d.world_size) if d is not None else (0, 1)
    tmp = ckpt_dir / f".step_{step}.tmp"
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that crashed
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier(d)
    with single_process_ok():
        dcp.save(trainer.checkpoint_state(), checkpoint_id=tmp, no_dist=no_process_group())
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    _barrier(d)
    final = ckpt_dir / f"step_{step}"
    if rank == 0:
        write_json_atomic(tmp / META, {"step": step, "config_hash": stage_hash, "world_size": world,
                                       "compute_threads": torch.get_num_threads(), **trainer.checkpoint_meta()})
        replace_dir_atomic(tmp, final)
        write_text_atomic(ckpt_dir / "latest", f"{step}\n")
        if keep is not None:
            for old in steps(ckpt_dir)[:-keep]:
                shutil.rmtree(ckpt_dir / f"step_{old}")
    _barrier(d)
    return final


def steps(ckpt_dir: Path) -> list[int]:
    """Steps with a complete checkpoint (a step folder appears only by rename, with its meta.json inside)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*")
                  if p.name.split("_")[1].isdigit() and (p / META).is_file())


def read_meta(path: Path) -> dict:
    return json.loads((path / META).read_text())


def resume(ckpt_dir: Path, trainer, stage_hash: str, d=None) -> int:
    """Load the newest complete checkpoint on disk into the trainer's model and optimizer (resharding to this run's
    ranks where the backend can); returns its step, 0 when there is none. Every rank calls this; rank 0 picks the
    checkpoint."""
    found = steps(ckpt_dir)
    step = found[-1] if found else 0
    step = d.broadcast(step) if d is not None else step
    if not step:
        return 0
    path = ckpt_dir / f"step_{step}"
    meta = read_meta(path)
    if meta["config_hash"] != stage_hash:
        raise RuntimeError(f"{path} was written under another config (hash {meta['config_hash']} != {stage_hash}); "
                           "run.overwrite=true starts this consolidation afresh")
    trainer.check_checkpoint(meta, path)
    threads = meta.get("compute_threads")
    if threads is not None and threads != torch.get_num_threads() and (d is None or d.is_main):
        # CPU GEMMs split their sums by thread, so the rounding (and, through Adam, the weights) depends on it
        log.warning(f"{path} was written with {threads} compute threads per rank and this run has "
                    f"{torch.get_num_threads()} (OMP_NUM_THREADS): the result will not be bit-identical to an "
                    "uninterrupted run")
    state = trainer.checkpoint_state()
    with single_process_ok():
        dcp.load(state, checkpoint_id=path, no_dist=no_process_group())
    trainer.load_checkpoint_state(state)
    rank = d.rank if d is not None else 0
    rng_file = path / f"rng_rank{rank}.pt"
    if not rng_file.is_file():  # more ranks now than when it was written
        rng_file = path / "rng_rank0.pt"
    _set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return step


def full_model_state(model, d=None) -> Optional[dict]:
    """The whole model's state dict on rank 0 (gathered from FSDP2 shards: a collective), None on other ranks."""
    if d is None or not d.enabled:
        return None  # the model holds full tensors already
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not d.is_main:
        return None
    # tied parameters (embedding = LM head) come back as separate copies: share them again, so save_pretrained
    # recognises the tie and writes the weight once, as the unsharded model does
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first and name in state:
            state[name] = state[first[id(p)]]
        first.setdefault(id(p), name)
    return state


def export_hf(model, tokenizer, out_dir: Path, state_dict: Optional[dict] = None) -> Path:
    """A Hugging Face folder (safetensors + tokenizer), moved into place only once complete. When several jobs
    export the same checkpoint at once, the first rename wins and the others discard their copy. `state_dict`
    replaces the model's own weights (a full state gathered from shards)."""
    if (out_dir / "config.json").is_file():
        return out_dir
    refuse_non_finite(state_dict if state_dict is not None else model.state_dict(), out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(out_dir.parent, prefix=f".{out_dir.name}.")
    model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    default_modes(tmp)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
        shutil.rmtree(tmp)
    return out_dir


def refuse_non_finite(state: dict, out_dir: Path) -> None:
    """A model with a NaN or infinite weight (in the dtype it is saved in: a float32 weight beyond float16's range
    becomes inf in a float16 export) is never written: NonFiniteWeights, naming the tensor."""
    bad = numerics.first_non_finite(state.items())
    if bad is not None:
        raise NonFiniteWeights(f"refusing to export {out_dir}: {bad}; nothing written. Likely causes: a learning "
                               "rate too high (consolidate.lr), or weights beyond the range of trainer.export_dtype")


@contextmanager
def single_process_ok():
    """DCP warns on every call without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def no_process_group() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def _barrier(d) -> None:
    if d is not None:
        d.barrier()
