"""What every stage needs: the config, the run's paths, its hash, and models loaded once per process."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from oel_hpc.pipeline import STAGE_KEYS, model_path
from oel_hpc.progress import TaskRecord
from oel_hpc.prompts import PromptBuilder, context_needed, prompt_budgets
from oel_hpc.rundir import RunPaths


def same_architecture(a: str, b: str) -> bool:
    """Two model folders whose config.json agree but for the version that wrote them, with the same tokenizer."""
    from oel_hpc.model_files import TOKENIZER_FILES

    def shape(path: str) -> tuple:
        config = json.loads((Path(path) / "config.json").read_text())
        tokenizer = {n: (Path(path) / n).read_bytes() for n in TOKENIZER_FILES if (Path(path) / n).is_file()}
        return {k: v for k, v in config.items() if k != "transformers_version"}, tokenizer

    try:
        return shape(a) == shape(b)
    except (OSError, ValueError):
        return False


def wandb_config(cfg: DictConfig, r: int, stage: str, task: Optional[int], stage_hash: str) -> dict:
    """What a task's wandb run shows as its config: the keys its stage reads (pipeline.STAGE_KEYS; runs of a sweep
    differ there) and the model, without reading any other key."""
    def value(key: str):
        found = OmegaConf.select(cfg, key)
        return OmegaConf.to_container(found, resolve=True) if isinstance(found, DictConfig) else found

    return {"round": r, "stage": stage, "task": task, "stage_hash": stage_hash, "model": value("model"),
            **{key: value(key) for key in STAGE_KEYS[stage]}}


@dataclass
class StageContext:
    cfg: DictConfig
    paths: RunPaths
    hashes: dict[str, str]  # node id → config hash (consolidation stamps its checkpoints with it)
    _engine: Optional[tuple[str, Any]] = field(default=None, repr=False)

    def stage_hash(self, r: int, stage: str) -> str:
        return self.hashes[f"r{r}/{stage}"]

    def engine(self, path: str, stage: str):
        """The generation engine for a model; one stays loaded, so consecutive stages on one model share it. A vLLM
        engine takes the weights of another model of the same architecture (the next evaluated checkpoint) in
        place of a new engine, and is rebuilt for a stage whose prompts and answers need longer sequences than it
        was sized for."""
        context = context_needed(self.cfg, stage)
        if self._engine is not None and getattr(self._engine[1], "max_model_len", context) < context:
            self.drop_engine()
        if self._engine is not None and self._engine[0] != path and hasattr(self._engine[1], "reload") \
                and same_architecture(self._engine[0], path) and self._engine[1].reload(path):
            self._engine = (path, self._engine[1])
        if self._engine is None or self._engine[0] != path:
            from oel_hpc.engines import build_engine

            self.drop_engine()  # free the old model before loading the next
            m = self.cfg.model
            self._engine = (path, build_engine(self.cfg.engine, path, dtype=m.dtype, device=self.cfg.trainer.device,
                                               thinking=m.thinking, context=context))
        return self._engine[1]

    def round_engine(self, r: int, stage: str):
        return self.engine(model_path(self.cfg, self.paths, r), stage)

    def tokenizer(self, r: int):
        """The round model's tokenizer, without loading its weights when no engine holds them already."""
        path = model_path(self.cfg, self.paths, r)
        if self._engine is not None and self._engine[0] == path:
            return self._engine[1].tokenizer
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)

    def drop_engine(self) -> None:
        if self._engine is not None and hasattr(self._engine[1], "close"):
            self._engine[1].close()
        self._engine = None

    def record(self, r: int, stage: str, task: Optional[int], total: int, unit: str = "step",
               keep_upto: Optional[int] = None, enabled: Optional[bool] = None) -> TaskRecord:
        """The task's progress record (oel_hpc/progress.py) and its wandb run; use it as a context manager (the
        wandb run ends with the task). `keep_upto`: resumed after unit k, keep the rows up to it (else a fresh
        record). Written by rank 0 only (`enabled`: this process's say, by default rank 0 of the environment)."""
        from oel_hpc.ranks import detect_env
        from oel_hpc.tracking import WandbRun, task_label, wandb_run_id

        path = self.paths.progress(r, stage, task)
        enabled = detect_env().rank == 0 if enabled is None else enabled
        run = None
        if enabled:
            cfg = self.cfg
            run = WandbRun(cfg.wandb, group=cfg.run.name, job_type=stage, name=task_label(r, stage, task),
                           run_id=wandb_run_id(self.paths.root, cfg.run.name, r, stage, task,
                                               self.stage_hash(r, stage)),
                           folder=path.parent, record_name=self.paths.display(path),
                           config=wandb_config(cfg, r, stage, task, self.stage_hash(r, stage)))
        try:
            return TaskRecord(path, total, unit, run, keep_upto=keep_upto, enabled=enabled)
        except BaseException:
            if run is not None:
                run.finish(failed=True)
            raise

    def prompt_builder(self, engine) -> PromptBuilder:
        return PromptBuilder(self.cfg.prompts, engine.count_chat_tokens, *prompt_budgets(self.cfg))
