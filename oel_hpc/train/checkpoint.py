"""Training state on disk: model, optimizer, RNG and step, written atomically, found again by scanning the folder.

A resumed job (crash, requeue) looks for its newest complete checkpoint itself rather than trusting a path it was
given, and refuses one written under another config.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from oel_hpc.rundir import RunPaths, replace_dir_atomic, write_text_atomic

STATE = "state.pt"


def save(ckpt_dir: Path, step: int, model, optimizer, stage_hash: str, keep: Optional[int] = None) -> Path:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ckpt_dir, prefix=f".step_{step}."))
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"step": step, "config_hash": stage_hash, "model": model.state_dict(),
                "optimizer": optimizer.state_dict(), "rng": rng}, tmp / STATE)
    final = ckpt_dir / f"step_{step}"
    replace_dir_atomic(tmp, final)
    write_text_atomic(ckpt_dir / "latest", f"{step}\n")
    if keep is not None:
        for old in sorted(steps(ckpt_dir))[:-keep]:
            shutil.rmtree(ckpt_dir / f"step_{old}")
    return final


def steps(ckpt_dir: Path) -> list[int]:
    """Steps with a complete checkpoint (state files appear only by rename, so presence means complete)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*") if (p / STATE).is_file())


def resume(ckpt_dir: Path, model, optimizer, stage_hash: str) -> int:
    """Load the newest checkpoint into model and optimizer; returns its step, 0 when there is none."""
    found = steps(ckpt_dir)
    if not found:
        return 0
    path = ckpt_dir / f"step_{found[-1]}" / STATE
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["config_hash"] != stage_hash:
        raise RuntimeError(f"{path} was written under another config (hash {state['config_hash']} != {stage_hash}); "
                           "run.overwrite=true starts this consolidation afresh")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def export_hf(model, tokenizer, out_dir: Path) -> Path:
    """A Hugging Face folder (safetensors + tokenizer), moved into place only once complete. When several jobs
    export the same checkpoint at once, the first rename wins and the others discard their copy."""
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():
            raise
        shutil.rmtree(tmp)
    return out_dir


def export_for_eval(cfg, paths: RunPaths, r: int, step: int) -> Path:
    """The model of an intermediate checkpoint as a Hugging Face folder beside it, exported once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from oel_hpc.engines.hf import DTYPES
    from oel_hpc.pipeline import model_path

    out = paths.ckpt(r, step) / "hf"
    if (out / "config.json").is_file():
        return out
    base = model_path(cfg, paths, r)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=DTYPES[cfg.trainer.dtype])
    state = torch.load(paths.ckpt(r, step) / STATE, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    return export_hf(model, AutoTokenizer.from_pretrained(base), out)
