"""Training state on disk with torch.distributed.checkpoint (DCP): model and optimizer (sharded by whatever wrote
them), plus step, config hash and RNG; written atomically, checksummed, and found again by scanning the folder.

    ckpt/step_<k>/            one complete checkpoint (the folder appears only by rename)
        .metadata  __<rank>_0.distcp ...   DCP: {"model": ..., "optimizer": ...}, keys as in the HF model
        rng_rank<r>.pt        torch / python / cuda RNG of each rank that wrote it
        meta.json             {step, config_hash, world_size, trainer, ..., files: {name: {size, sha256}},
                              meta_sha256}: written last, before the rename
        hf/                   (later, once) the model as a Hugging Face folder, made by train/export.py
    ckpt/latest               the newest step, for people (resume never reads it: it scans step_*/meta.json)
    ckpt/.step_<k>.<host>.<pid>.<random>.tmp/   a save in progress, its name unique to the process that writes it
    ckpt/damaged_step_<k>.<random>/             a checkpoint that failed its checks at resume, moved aside

A resumed job (crash, requeue) looks for its newest complete checkpoint itself rather than trusting a path it was
given, refuses one written under another config, and may run on another number of ranks than the writer: DCP
reshards on load. One process (no process group) uses the same format.

Checkpoints are verified, not trusted: meta.json records the size and sha256 of every file the save wrote (and a
digest of itself), and resume checks them before loading. A checkpoint that fails (a file missing, cut short or
changed; a load that raises) is reported in one warning line naming the file, moved aside, and the next older one
is tried. Hashing is split over the ranks (each hashes the files it wrote); on the tiny model it costs about a
millisecond per MB (docs/run-directory.md).

It knows no backend: what a checkpoint holds comes from the trainer's `checkpoint_state` / `checkpoint_meta`
(train/backend.py), and the backends import this module, never the reverse.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import secrets
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from oel_hpc.errors import DamagedCheckpoint, NonFiniteWeights
from oel_hpc.log import get_logger
from oel_hpc.rundir import (default_modes, make_temp_dir, replace_dir_atomic, sha256_file, this_host, unique_suffix,
                            write_json_atomic, write_text_atomic)
from oel_hpc.train import numerics

META = "meta.json"
STALE_TMP_AFTER_S = 3600  # a temporary folder nobody has written to for this long belongs to a dead save
log = get_logger(__name__)


def _rng_state() -> dict:
    rng = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def _set_rng_state(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
    version, state, gauss = rng["python"]
    random.setstate((version, tuple(state), gauss))
    if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(rng["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# Save

def save(ckpt_dir: Path, step: int, trainer, stage_hash: str, keep: Optional[int] = None, d=None) -> Path:
    """Every rank calls this (DCP writes each rank's shards): `trainer.checkpoint_state()` (model and optimizer
    under the backend's keys) and its `checkpoint_meta()` into meta.json, with the size and sha256 of every file."""
    rank, world = (d.rank, d.world_size) if d is not None else (0, 1)
    name = None
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        name = _tmp_name(step)  # unique: two processes saving the same step never share (or delete) a folder
        (ckpt_dir / name).mkdir()
    tmp = ckpt_dir / _broadcast(d, name)  # a collective: the folder exists before any rank writes into it
    with single_process_ok():
        written = dcp.save(trainer.checkpoint_state(), checkpoint_id=tmp, no_dist=no_process_group())
    torch.save(_rng_state(), tmp / f"rng_rank{rank}.pt")
    _barrier(d)
    # named by what the save wrote, not by listing the folder (a shared file system may list late)
    names = sorted({info.relative_path for info in written.storage_data.values()}
                   | {".metadata"} | {f"rng_rank{r}.pt" for r in range(world)})
    files = _digests(tmp, names, d)
    final = ckpt_dir / f"step_{step}"
    if rank == 0:
        meta = {"step": step, "config_hash": stage_hash, "world_size": world,
                "compute_threads": torch.get_num_threads(), **trainer.checkpoint_meta(), "files": files}
        write_json_atomic(tmp / META, {**meta, "meta_sha256": _meta_digest(meta)})
        replace_dir_atomic(tmp, final)
        write_text_atomic(ckpt_dir / "latest", f"{step}\n")
        if keep is not None:
            for old in steps(ckpt_dir)[:-keep]:
                shutil.rmtree(ckpt_dir / f"step_{old}")
    _barrier(d)
    return final


def _tmp_name(step: int) -> str:
    return f".step_{step}.{unique_suffix()}.tmp"


_TMP = re.compile(r"^\.step_\d+\.(?:(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.[0-9a-f]+\.)?(?:tmp|old)$")


def remove_stale_tmp(ckpt_dir: Path, now: Optional[float] = None) -> list[str]:
    """Remove the temporary folders of saves that died (a killed job leaves its `.step_<k>.*.tmp` behind); returns
    their names. Removed only when it is safe without knowing who else writes here: the writer was a process on
    this host that no longer exists, or nothing in the folder changed for STALE_TMP_AFTER_S (a writer on another
    host, or a name without one, as older versions wrote). A folder of a live save is left alone."""
    if not ckpt_dir.is_dir():
        return []
    now, removed = time.time() if now is None else now, []
    for p in ckpt_dir.iterdir():
        m = _TMP.match(p.name)
        if not m or not p.is_dir():
            continue
        pid = int(m["pid"] or 0)
        dead_here = m["host"] == this_host() and (pid == os.getpid() or not _alive(pid))
        if dead_here or now - _newest_mtime(p) > STALE_TMP_AFTER_S:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _newest_mtime(folder: Path) -> float:
    times = [folder.stat().st_mtime]
    for p in folder.rglob("*"):
        try:
            times.append(p.stat().st_mtime)
        except FileNotFoundError:
            pass
    return max(times)


# ---------------------------------------------------------------------------------------------------------------
# Checksums

def _owner(name: str, world: int) -> int:
    """The rank that hashes a file: the rank that wrote it (its page cache still holds it), else rank 0."""
    m = re.fullmatch(r"__(\d+)_\d+\.distcp|rng_rank(\d+)\.pt", name)
    return int(m[1] or m[2]) % world if m else 0


def _digests(folder: Path, names: list[str], d=None) -> dict:
    """{name: {size, sha256}} of the files `names` in `folder`, each hashed on one rank, gathered everywhere;
    {name: {"error": ...}} for one that cannot be read."""
    rank, world = (d.rank, d.world_size) if d is not None and d.enabled else (0, 1)
    mine = {}
    for name in names:
        if _owner(name, world) != rank:
            continue
        try:
            mine[name] = {"size": (folder / name).stat().st_size, "sha256": sha256_file(folder / name)}
        except OSError as e:
            mine[name] = {"error": e.strerror or type(e).__name__}
    merged = {}
    for part in _gather(d, mine):
        merged.update(part)
    return {name: merged[name] for name in names}


def _meta_digest(meta: dict) -> str:
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def _read_checked_meta(path: Path, step: int) -> tuple[Optional[dict], Optional[str]]:
    """(meta.json, None) when it is intact and names this step; (None, what is wrong) otherwise. A meta.json of an
    older version (no checksums) is accepted as it is."""
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        return None, f"{META} is missing"
    except (OSError, ValueError) as e:
        return None, f"{META} cannot be read ({e})"
    if not isinstance(meta, dict):
        return None, f"{META} is not a JSON object"
    if "meta_sha256" in meta:
        recorded = meta.pop("meta_sha256")
        if recorded != _meta_digest(meta):
            return None, f"{META} does not match its own checksum"
    if meta.get("step") != step:
        return None, f"{META} is for step {meta.get('step')}"
    return meta, None


def verify(path: Path, meta: dict, d=None) -> Optional[str]:
    """What is wrong with the files of the checkpoint at `path` against what its meta.json recorded (the first
    file that differs), or None. Every rank calls this (hashing is split over them)."""
    recorded = meta.get("files")
    if recorded is None:
        return None  # written before checkpoints carried checksums: resume says so
    found = _digests(path, sorted(recorded), d)
    for name in sorted(recorded):
        want, got = recorded[name], found[name]
        if "error" in got:
            return f"{name}: {got['error']}"
        if got["size"] != want["size"]:
            return f"{name} has {got['size']} bytes, {want['size']} were written"
        if got["sha256"] != want["sha256"]:
            return f"{name} does not match its sha256 in {META}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Resume

def steps(ckpt_dir: Path) -> list[int]:
    """Steps with a complete checkpoint (a step folder appears only by rename, with its meta.json inside)."""
    return [s for s in _step_folders(ckpt_dir) if (ckpt_dir / f"step_{s}" / META).is_file()]


def _step_folders(ckpt_dir: Path) -> list[int]:
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name.split("_")[1]) for p in ckpt_dir.glob("step_*")
                  if p.name.split("_")[1].isdigit() and p.is_dir())


def resume(ckpt_dir: Path, trainer, stage_hash: str, d=None) -> int:
    """Load the newest checkpoint on disk that passes its checks into the trainer's model, optimizer and RNG
    (resharding to this run's ranks where the backend can); returns its step, 0 when there is none. Every rank
    calls this; rank 0 reads the folder and meta.json, all ranks share the hashing, and every decision is rank 0's
    (or agreed by all), so all ranks load the same checkpoint.

    A damaged checkpoint (meta.json unreadable or not matching its digest, a file missing, cut short or changed, a
    load that raises) is reported in one warning line naming the file, moved aside to `damaged_step_<k>.<random>`
    (kept for inspection, out of the way of later saves and resumes), and the next older one is tried. When none
    is left, training starts afresh from the round's base weights with a warning: that is the result an
    uninterrupted run gives, only later. One exception: when a load raised after it may have written into the
    model (DCP loads in place), no checkpoint loaded after it, and so the weights are neither the base ones nor a
    checkpoint's: that raises DamagedCheckpoint (run the command again: the damaged checkpoint is out of the way).

    A checkpoint written under another config, or one the backend cannot load (another trainer, precision, ...),
    is refused: an error, not damage."""
    main = d is None or d.is_main
    if main:
        for name in remove_stale_tmp(ckpt_dir):
            log.info(f"removed {ckpt_dir / name}: the temporary folder of a save that did not finish")
    candidates = _broadcast(d, _step_folders(ckpt_dir)[::-1] if main else None)
    touched = None  # a checkpoint whose load raised: the model may hold part of it
    for step in candidates:
        path = ckpt_dir / f"step_{step}"
        meta, problem = _read_checked_meta(path, step) if main else (None, None)
        meta, problem = _broadcast(d, (meta, problem))
        if problem is None:
            _refuse_other_config(path, meta, stage_hash, trainer)
            if "files" not in meta and main:
                log.warning(f"{path} carries no checksums (written by an older version): loading it unverified")
            problem = verify(path, meta, d)
        if problem is None:
            problem, partly = _load(path, trainer, d)
            touched = path if partly else touched
        if problem is None:
            if main:
                _warn_if_not_exact(path, meta, d)
            return step
        if main:
            aside = _move_aside(path)
            log.warning(f"checkpoint {path} is damaged: {problem}; moved aside to {aside.name}, trying an older one")
        _barrier(d)
    if touched is not None:
        raise DamagedCheckpoint(
            f"{touched}: loading it failed after it may have written into the model, and no older checkpoint "
            "loaded; the damaged checkpoints are moved aside: run the same command again to start afresh")
    if candidates and main:
        log.warning(f"no checkpoint in {ckpt_dir} passed its checks: training starts afresh from the round's base "
                    "weights (the result equals an uninterrupted run's)")
    return 0


def check_intact(path: Path) -> dict:
    """The meta.json of the checkpoint at `path` once its files match what it recorded (one process, e.g. an
    evaluation task exporting it); DamagedCheckpoint naming the file otherwise."""
    meta, problem = _read_checked_meta(path, int(path.name.split("_")[1]))
    if problem is None:
        problem = verify(path, meta)
    if problem is not None:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {problem}")
    return meta


def _refuse_other_config(path: Path, meta: dict, stage_hash: str, trainer) -> None:
    if meta["config_hash"] != stage_hash:
        raise RuntimeError(f"{path} was written under another config (hash {meta['config_hash']} != {stage_hash}); "
                           "run.overwrite=true starts this consolidation afresh")
    trainer.check_checkpoint(meta, path)


def _load(path: Path, trainer, d=None) -> tuple[Optional[str], bool]:
    """Load the checkpoint at `path` into the trainer and RNG. Returns (what went wrong, agreed by all ranks, or
    None; whether the model may hold part of it). What can be read without touching the model is read first."""
    rank = d.rank if d is not None else 0
    rng_file = path / f"rng_rank{rank}.pt"
    if not rng_file.is_file():  # more ranks now than when it was written
        rng_file = path / "rng_rank0.pt"
    rng, problem = None, None
    try:  # weights_only: no code runs from a file that may not be ours
        rng = torch.load(rng_file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read it is damage
        problem = f"{rng_file.name} cannot be loaded ({_one_line(e)})"
    if problem is None:
        try:
            dcp.FileSystemReader(str(path)).read_metadata()
        except Exception as e:  # noqa: BLE001
            problem = f".metadata cannot be loaded ({_one_line(e)})"
    problem = _first(d, problem)
    if problem is not None:
        return problem, False
    state = trainer.checkpoint_state()
    try:
        with single_process_ok():
            dcp.load(state, checkpoint_id=path, no_dist=no_process_group())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - DCP raises on every rank if any read fails
        problem = f"a shard cannot be loaded ({_one_line(e)})"
    problem = _first(d, problem)
    if problem is not None:
        return problem, True
    trainer.load_checkpoint_state(state)
    _set_rng_state(rng)
    return None, False


def _warn_if_not_exact(path: Path, meta: dict, d=None) -> None:
    """A resume is bit-identical to an uninterrupted run only under the same compute threads and ranks."""
    threads = meta.get("compute_threads")
    if threads is not None and threads != torch.get_num_threads():
        # CPU GEMMs split their sums by thread, so the rounding (and, through Adam, the weights) depends on it
        log.warning(f"{path} was written with {threads} compute threads per rank and this run has "
                    f"{torch.get_num_threads()} (OMP_NUM_THREADS): the result will not be bit-identical to an "
                    "uninterrupted run")
    world = d.world_size if d is not None else 1
    if meta.get("world_size", world) != world:
        # each rank sums its own rows' gradients before the ranks average them: another grouping, another rounding
        log.warning(f"{path} was written by {meta['world_size']} ranks and this run has {world}: the result will "
                    "equal an uninterrupted run only to rounding, not bit for bit (docs/run-directory.md)")


def _move_aside(path: Path) -> Path:
    aside = path.with_name(f"damaged_{path.name}.{secrets.token_hex(4)}")
    os.replace(path, aside)
    return aside


def _one_line(e: BaseException) -> str:
    if isinstance(e, CheckpointException) and e.failures:  # its text is every rank's traceback: the first error
        e = next(iter(e.failures.values()))[0]
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


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


def _broadcast(d, obj):
    """Rank 0's `obj` on every rank (as is without a process group)."""
    return d.broadcast(obj) if d is not None else obj


def _gather(d, obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if d is None or not d.enabled:
        return [obj]
    out = [None] * d.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _first(d, problem: Optional[str]) -> Optional[str]:
    """The first rank's problem (None when no rank had one): a verdict every rank shares."""
    return next((p for p in _gather(d, problem) if p is not None), None)
