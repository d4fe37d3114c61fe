"""Game seeds: a fixed held-out list, and training seeds kept off it. Two schemes (``env.seeds``).

docs/design.md: held-out games are one fixed seed list shared by every round and stage; extraction
and deploy seeds change with the round and must never hit a held-out game.

``oel`` (this project's): held-out seeds are simply ``0, 1, …, n-1`` (n ≤ 100 000 in practice;
anything below ``TRAIN_SEED_MIN`` = 2**20 is reserved for held-out use). Training seeds are
hashed from their coordinates into ``[2**20, 2**53)``, so they are disjoint from every held-out
seed, reproducible across machines and Python versions (sha256, not ``hash()``), independent per
(stage, round, task, index), and still exact in JSON readers that use doubles.

``paper`` (the authors' formulas, read from their ``ray_trainer.py`` and scripts; ``r`` is the
round, 1-based like their ``oel_round``; steps are 1-based):

* held-out game i: ``468460046 + 1000·i`` (their 128-game set, also the extraction scores curve);
* extraction step k of round r: ``468460046 + 500000·r + 1000·(128 + k − 1)``, the same for every
  extraction seed: their 10 "checkpoints" 50…500 only seed the sampler, so all 10 runs play one
  game sequence (``extract.shared_games=true``);
* deployment game i of step k in round r, ``G`` games per step (theirs: 128):
  ``505209463 + 10⁷·(r − 1) + 1000·(k·G + i)``.

The paper scheme keeps training seeds off the held-out list only for the sizes they used; nothing
in the formulas forbids a collision (e.g. more than 628 held-out games), so
:func:`heldout_collisions` finds them and the config validation refuses such a run. Seeds are not
boards: distinct seeds can deal the same board (Frozen Lake 3×3 has only 19 maps).
"""

from __future__ import annotations

import hashlib
import json

HELDOUT_MAX = 100_000
TRAIN_SEED_MIN = 2**20
TRAIN_SEED_MAX = 2**53  # exclusive


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


# -- the two schemes -------------------------------------------------------------------------------------------------

SEED_SCHEMES = ("oel", "paper")

PAPER_HELDOUT_BASE = 468_382_021 + 78_025  # = 468 460 046
PAPER_HELDOUT_SIZE = 128  # the authors' held_out_size: extraction seeds start right after it
PAPER_EXTRACT_ROUND_STRIDE = 500_000
PAPER_DEPLOY_BASE = 505_019_424 + 90_039 + 100_000  # = 505 209 463
PAPER_DEPLOY_ROUND_STRIDE = 10_000_000
PAPER_STRIDE = 1000


def _check_scheme(scheme: str) -> None:
    if scheme not in SEED_SCHEMES:
        raise ValueError(f"seed scheme must be one of {SEED_SCHEMES}, got {scheme!r}")


def _check_counts(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def heldout_seeds(n: int, scheme: str = "oel") -> list[int]:
    """The fixed held-out seed list of ``scheme`` for 0 ≤ n ≤ 100 000."""
    _check_scheme(scheme)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= HELDOUT_MAX:
        raise ValueError(f"n must be an int in [0, {HELDOUT_MAX}], got {n!r}")
    if scheme == "paper":
        return [PAPER_HELDOUT_BASE + PAPER_STRIDE * i for i in range(n)]
    return list(range(n))


def extract_seed(round: int, task: int, step: int, *, scheme: str = "oel", shared: bool = False) -> int:  # noqa: A002
    """The game of extraction ``step`` (1-based) for extraction seed ``task`` in ``round``. ``shared``: every task
    plays the same sequence (the paper scheme has only that one)."""
    _check_scheme(scheme)
    _check_counts(round=round, task=task, step=step)
    if scheme == "paper":
        if not shared:
            raise ValueError("the paper seed scheme gives every extraction seed the same games; it needs shared=True")
        if round < 1 or step < 1:
            raise ValueError(f"round and step are 1-based, got round={round}, step={step}")
        return (PAPER_HELDOUT_BASE + PAPER_EXTRACT_ROUND_STRIDE * round
                + PAPER_STRIDE * (PAPER_HELDOUT_SIZE + step - 1))
    return train_seed("extract", round, 0 if shared else task, step)


def deploy_seeds(round: int, step: int, games: int, *, scheme: str = "oel") -> list[int]:  # noqa: A002
    """The ``games`` games of deployment ``step`` (1-based) in ``round``."""
    _check_scheme(scheme)
    _check_counts(round=round, step=step, games=games)
    if scheme == "paper":
        if round < 1 or step < 1:
            raise ValueError(f"round and step are 1-based, got round={round}, step={step}")
        first = PAPER_DEPLOY_BASE + PAPER_DEPLOY_ROUND_STRIDE * (round - 1)
        return [first + PAPER_STRIDE * (step * games + i) for i in range(games)]
    return [train_seed("deploy", round, step, i) for i in range(games)]


def heldout_collisions(scheme: str, *, heldout: int, rounds: int, extract_seeds: int, extract_steps: int,
                       shared_extract: bool, deploy_steps: int, deploy_games: int) -> list[int]:
    """Every training seed (extraction or deployment, any round) that is also a held-out seed, sorted."""
    held = set(heldout_seeds(heldout, scheme))
    tasks = 1 if shared_extract else extract_seeds
    training = {extract_seed(r, t, k, scheme=scheme, shared=shared_extract)
                for r in range(1, rounds + 1) for t in range(tasks) for k in range(1, extract_steps + 1)}
    for r in range(1, rounds + 1):
        for k in range(1, deploy_steps + 1):
            training.update(deploy_seeds(r, k, deploy_games, scheme=scheme))
    return sorted(held & training)
