"""Which mode wandb runs in: what the user asked for, never what a credential suggests.

Compute nodes rarely reach the internet, so online is something to ask for: `wandb.mode=online|offline|disabled`
in the config wins; under `wandb.mode=auto` (the default) an explicit `WANDB_MODE` in the environment wins; else
offline (`wandb sync <run>/round_<r>/consolidate/wandb/offline-run-*` uploads it later). A `WANDB_API_KEY` in the
environment is not a request to go online: it is set on login nodes and inherited by every job.
"""
from __future__ import annotations

import os
from typing import Mapping, Optional

from oel_hpc.errors import ConfigError

# WANDB_MODE values wandb itself accepts, and what each means here (dryrun and run are its old names)
WANDB_ENV_MODES = {"online": "online", "run": "online", "shared": "shared", "offline": "offline",
                   "dryrun": "offline", "disabled": "disabled"}


def wandb_mode(configured: str, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The mode to pass to wandb.init for `wandb.mode=configured`; None when wandb is off. A WANDB_MODE that wandb
    would refuse is a ConfigError (wandb reads it even when the config names the mode)."""
    environ = os.environ if environ is None else environ
    env = environ.get("WANDB_MODE", "").strip()
    if str(configured) == "disabled":
        return None
    if env and env.lower() not in WANDB_ENV_MODES:
        raise ConfigError("WANDB_MODE", f"'{env}' is not a wandb mode (environment variable; one of: "
                          f"{', '.join(WANDB_ENV_MODES)})")
    if str(configured) != "auto":
        mode = str(configured)
    else:
        mode = WANDB_ENV_MODES[env.lower()] if env else "offline"
    return None if mode == "disabled" else mode
