"""Gather: experience_<use_step> of every extraction seed into one list. A missing file is an error; an empty
experience is reported loudly (consolidation refuses to start if every one is empty)."""
from __future__ import annotations

from pathlib import Path

from oel_hpc import log
from oel_hpc.errors import MissingInput
from oel_hpc.experience import ExperienceEntry, entry_dict, read_source, sha256_text
from oel_hpc.rundir import write_json_atomic, write_text_atomic
from oel_hpc.stages.common import StageContext

logger = log.get_logger(__name__)


def run(ctx: StageContext, r: int, task=None) -> list[Path]:
    cfg, paths = ctx.cfg, ctx.paths
    tokenizer = ctx.tokenizer(r)
    entries = []
    sources = list(_sources(cfg, paths, r))
    with ctx.record(r, "gather", None, total=len(sources)) as record:
        for k, (seed, step, path, text) in enumerate(sources, 1):
            tokens = len(tokenizer.encode(text, add_special_tokens=False))
            if not text.strip():
                logger.warning(f"round {r} extraction seed {seed} wrote an EMPTY experience_{step} "
                               f"({paths.rel(path)}): its rows would teach nothing")
            entries.append(ExperienceEntry(seed, step, paths.rel(path), sha256_text(text), tokens))
            record.step(k, seed=seed, experience_tokens=tokens)
    outputs = [paths.experience_list(r)] + [paths.root / e.path for e in entries]
    write_json_atomic(paths.experience_list(r), [entry_dict(e) for e in entries])
    return outputs


def _sources(cfg, paths, r: int):
    """(seed, step, file in the run directory, text) of every experience to gather."""
    if cfg.gather.source is not None:  # copied in, so the run directory stays self-contained and movable
        for i, (_, text) in enumerate(read_source(Path(cfg.gather.source))):
            copy = paths.round(r) / "gather" / f"experience_{i}.txt"
            write_text_atomic(copy, text)
            yield i, 0, copy, text
        return
    step = cfg.extract.use_step
    for seed in range(cfg.extract.seeds):
        path = paths.experience(r, seed, step)
        if not path.is_file():
            raise MissingInput(path, f"gather: {path} does not exist (did extraction seed {seed} reach step {step}?)")
        yield seed, step, path, path.read_text()
