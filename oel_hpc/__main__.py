"""`python -m oel_hpc [overrides]`: run the OEL pipeline (Hydra entry point)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from oel_hpc.config import CONF_DIR, GROUPS, ConfigError, validate

_GROUP_OVERRIDE = re.compile(r"^[+~]{0,2}(?P<group>\w+)=(?P<value>.*)$")


def check_group_choices(argv: list[str]) -> None:
    """An unknown env/model/experiment/... gets a one-line error before Hydra's multi-line one."""
    for arg in argv:
        m = _GROUP_OVERRIDE.match(arg)
        if not m or m["group"] not in GROUPS:
            continue
        available = sorted(p.stem for p in (CONF_DIR / m["group"]).glob("*.yaml"))
        for value in m["value"].split(","):  # multirun sweeps list several
            if value and value != "null" and value not in available:
                raise ConfigError(m["group"], f"unknown {m['group']} '{value}' (available: {', '.join(available)})")


def run(cfg: DictConfig) -> None:
    from oel_hpc.launch.local import run_local
    from oel_hpc.pipeline import build_dag
    from oel_hpc.rundir import RunPaths, config_hash
    from oel_hpc.summary import summary

    paths = RunPaths(Path(cfg.run.root).resolve() / cfg.run.name)
    nodes = build_dag(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    run_hash = config_hash({k: v for k, v in resolved.items() if k != "run"})
    ran = run_local(cfg, paths, nodes, run_hash)
    if ran == 0:
        print(f"Nothing to do: every stage of run '{cfg.run.name}' is already done ({paths.root}). "
              "Pick another run.name for a new run.")
    print(summary(cfg, paths))


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    from oel_hpc.experience import EmptyExperience
    from oel_hpc.pipeline import StageConflict
    from oel_hpc.prompts import PromptTooLong

    try:
        validate(cfg)
        run(cfg)
    except (ConfigError, StageConflict, PromptTooLong, EmptyExperience, FileNotFoundError) as e:
        print(f"oel_hpc: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    try:
        check_group_choices(sys.argv[1:])
    except ConfigError as e:
        print(f"oel_hpc: error: {e}", file=sys.stderr)
        sys.exit(2)
    hydra_main()


if __name__ == "__main__":
    main()
