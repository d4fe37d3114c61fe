"""The two games as gymnasium envs: each binds a game's rules module (and textarena's board for a seed) to the
shared env class. Kept apart from the rules so that the rules, the env class and textarena's boards import one
another in one direction only."""
from __future__ import annotations

from . import frozen_lake, sokoban, textarena_boards
from .grid_env import GridGameEnv


class FrozenLake3x3Env(GridGameEnv):
    """Frozen Lake 3×3 as a gymnasium env (see GridGameEnv)."""

    game_name = "frozenlake"
    rules = frozen_lake
    textarena_board = staticmethod(textarena_boards.frozen_lake)


class Sokoban6x6Env(GridGameEnv):
    """Sokoban 6×6 as a gymnasium env (see GridGameEnv)."""

    game_name = "sokoban"
    rules = sokoban
    textarena_board = staticmethod(textarena_boards.sokoban)
