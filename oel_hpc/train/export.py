"""An intermediate checkpoint as a Hugging Face folder, for the evaluation stage: one process, whatever backend and
number of ranks wrote it. A trainer=megatron checkpoint is reassembled from its TP shards by pure tensor work
(train/megatron/convert.py, which does not import megatron): evaluation needs no megatron-core."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from transformers import AutoModelForCausalLM, AutoTokenizer

from oel_hpc.errors import MissingInput
from oel_hpc.pipeline import model_path
from oel_hpc.rundir import RunPaths
from oel_hpc.train.checkpoint import META, check_intact, export_hf, no_process_group, single_process_ok
from oel_hpc.train.megatron.convert import megatron_to_hf, shard_key
from oel_hpc.train.precision import Precision


def export_for_eval(cfg, paths: RunPaths, r: int, step: int) -> Path:
    """The model of an intermediate checkpoint as a Hugging Face folder beside it, exported once (concurrent
    evaluation tasks may race: the first rename wins). Reads only the model part of the DCP checkpoint, at any
    number of ranks it was written with; runs in one process."""
    out = paths.ckpt(r, step) / "hf"
    if (out / "config.json").is_file():
        return out
    if not (paths.ckpt(r, step) / META).is_file():
        raise MissingInput(paths.ckpt(r, step), f"{paths.ckpt(r, step)} is not a complete checkpoint")
    base = model_path(cfg, paths, r)
    # in trainer.export_dtype, as the final export (the checkpoint's weights are cast on load)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=Precision.from_config(cfg.trainer).export)
    meta = check_intact(paths.ckpt(r, step))  # a damaged checkpoint is refused, naming the file
    if meta.get("trainer", "torch") == "megatron":
        _load_megatron_shards(model, paths.ckpt(r, step), meta["tp"])
    else:
        state = {"model": get_model_state_dict(model)}
        with single_process_ok():
            dcp.load(state, checkpoint_id=paths.ckpt(r, step), no_dist=no_process_group())
        set_model_state_dict(model, state["model"])
    return export_hf(model, AutoTokenizer.from_pretrained(base), out)


def _load_megatron_shards(model, path: Path, tp: int) -> None:
    """A megatron checkpoint's TP shards (`tp<r>_of_<tp>.model.*`), reassembled into the HF model. Pure tensor
    work (no megatron import): shapes come from the checkpoint's own metadata."""
    stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    shards = []
    for rank in range(tp):
        prefix = f"{shard_key(rank, tp)}.model."
        template = {k[len(prefix):]: torch.empty(m.size, dtype=m.properties.dtype)
                    for k, m in stored.items() if k.startswith(prefix)}
        state = {shard_key(rank, tp): {"model": template}}
        with single_process_ok():
            dcp.load(state, checkpoint_id=path, no_dist=True)
        shards.append(state[shard_key(rank, tp)]["model"])
    hf_state = megatron_to_hf(shards, model.config)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"{path}: megatron shards do not match the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
