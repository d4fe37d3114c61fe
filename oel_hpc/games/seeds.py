"""Game seeds: a fixed held-out list, and training seeds provably disjoint from it.

DESIGN §1: held-out games are one fixed seed list shared by every round and stage; extraction
and deploy seeds change with the round and must never hit a held-out game. Held-out seeds are
simply ``0, 1, …, n-1`` (n ≤ 100 000 in practice; anything below ``TRAIN_SEED_MIN`` = 2**20 is
reserved for held-out use). Training seeds are hashed from their coordinates into
``[2**20, 2**53)``, so they are disjoint from every held-out seed, reproducible across machines
and Python versions (sha256, not ``hash()``), independent per (stage, round, task, index), and
still exact in JSON readers that use doubles.
"""

from __future__ import annotations

import hashlib
import json

HELDOUT_MAX = 100_000
TRAIN_SEED_MIN = 2**20
TRAIN_SEED_MAX = 2**53  # exclusive


def heldout_seeds(n: int) -> list[int]:
    """The fixed held-out seed list: ``list(range(n))`` for 0 ≤ n ≤ 100 000."""
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= HELDOUT_MAX:
        raise ValueError(f"n must be an int in [0, {HELDOUT_MAX}], got {n!r}")
    return list(range(n))


def train_seed(stage: str, round: int, task: int, index: int) -> int:  # noqa: A002
    """Deterministic seed for game ``index`` of ``task`` (e.g. extraction seed) in ``stage`` of
    ``round``; always ≥ 2**20, hence never a held-out seed."""
    if not isinstance(stage, str) or not stage:
        raise ValueError(f"stage must be a non-empty str, got {stage!r}")
    for name, value in (("round", round), ("task", task), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    key = json.dumps(["oel_hpc.train_seed.v1", stage, round, task, index]).encode()
    digest = int.from_bytes(hashlib.sha256(key).digest()[:8], "big")
    return TRAIN_SEED_MIN + digest % (TRAIN_SEED_MAX - TRAIN_SEED_MIN)
