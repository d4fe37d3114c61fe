"""The games (docs/design.md, "The games"): Frozen Lake 3×3 and Sokoban 6×6 as gymnasium envs, the text protocol
(:class:`TextGame`), action parsing, BFS solvers and seed lists. Torch-free by design.

Two board generators (this project's and textarena 0.7.4's, seed for seed) and two seed schemes (this
project's and the authors' formulas) are selectable; see ``grid_env.py`` and ``seeds.py``.

Importing this package registers ``oel/FrozenLake3x3-v0`` and ``oel/Sokoban6x6-v0`` with
gymnasium (idempotently, so re-imports and reloads are harmless).
"""

from __future__ import annotations

import gymnasium

from .envs import FrozenLake3x3Env, Sokoban6x6Env
from .frozen_lake import FrozenLakeState
from .grid_env import GENERATORS
from .parsing import ACTIONS, ALIASES, action_id, parse_action
from .protocol import LOG_SEPARATOR, TextGame, join_blocks
from .seeds import SEED_SCHEMES, deploy_seeds, extract_seed, heldout_seeds, train_seed
from .sokoban import SokobanState
from .solvers import optimal_actions, shortest_solution, solution_length

GAMES: dict[str, str] = {
    "frozenlake": "oel/FrozenLake3x3-v0",
    "sokoban": "oel/Sokoban6x6-v0",
}

_ENTRY_POINTS = {
    "oel/FrozenLake3x3-v0": "oel_hpc.games.envs:FrozenLake3x3Env",
    "oel/Sokoban6x6-v0": "oel_hpc.games.envs:Sokoban6x6Env",
}


def register_games() -> None:
    """Register both envs with gymnasium unless already registered."""
    for env_id, entry_point in _ENTRY_POINTS.items():
        if env_id not in gymnasium.envs.registry:
            gymnasium.register(id=env_id, entry_point=entry_point)


register_games()


def make_game(name: str, seed: int, max_calls: int = 5, *, generator: str = "oel",
              invalid_move_limit: int | None = None, text: dict | None = None) -> TextGame:
    """A :class:`TextGame` for ``name`` (a key of :data:`GAMES`), already reset with ``seed``
    (so ``game_log`` shows the first board). ``reset(seed=seed)`` replays the same board.
    ``generator``: ``oel`` (this project's boards) or ``textarena`` (the authors' library's boards for the same
    seed); ``invalid_move_limit``: consecutive invalid moves that end the game (textarena: 2; None = never);
    ``text``: a whole wording table (``prompts.game_text``: ``log`` and one section per game, see games/text.py),
    None keeps the defaults."""
    key = name.lower() if isinstance(name, str) else name
    if key not in GAMES:
        raise ValueError(f"unknown game {name!r}; allowed names: {', '.join(sorted(GAMES))}")
    # The env checker runs in the tests (check_env); skip its per-instance wrapper in rollouts.
    env = gymnasium.make(GAMES[key], disable_env_checker=True, generator=generator,
                         text=None if text is None else text[key])
    game = TextGame(env, max_calls=max_calls, invalid_move_limit=invalid_move_limit,
                    text=None if text is None else text["log"])
    game.reset(seed=seed)
    return game


__all__ = [
    "ACTIONS",
    "ALIASES",
    "GAMES",
    "GENERATORS",
    "LOG_SEPARATOR",
    "SEED_SCHEMES",
    "FrozenLake3x3Env",
    "FrozenLakeState",
    "Sokoban6x6Env",
    "SokobanState",
    "TextGame",
    "action_id",
    "deploy_seeds",
    "extract_seed",
    "heldout_seeds",
    "join_blocks",
    "make_game",
    "optimal_actions",
    "parse_action",
    "register_games",
    "shortest_solution",
    "solution_length",
    "train_seed",
]
