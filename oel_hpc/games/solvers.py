"""Breadth-first solvers for both games.

Why: the tests check that every generated map is solvable (and how many within the 5-call
budget), and a tiny-model builder needs "the optimal next move" for any state. Both games have
tiny state spaces (≤ 9 player cells; ≤ 16×16 player/box pairs), so exhaustive BFS over the
games' own pure ``transition`` functions is exact and fast, and cannot drift from the envs.
"""

from __future__ import annotations

from collections import deque
from types import ModuleType
from typing import Any

from . import frozen_lake, sokoban
from .parsing import ACTIONS

_BY_STATE: dict[type, ModuleType] = {
    frozen_lake.FrozenLakeState: frozen_lake,
    sokoban.SokobanState: sokoban,
}
_BY_NAME: dict[str, ModuleType] = {
    "frozenlake": frozen_lake,
    "oel/FrozenLake3x3-v0": frozen_lake,
    "sokoban": sokoban,
    "oel/Sokoban6x6-v0": sokoban,
}


def _game_module(game: Any, state: Any) -> ModuleType:
    """Resolve the rules from the state's type; ``game`` (a name, gym id, env, wrapper or None)
    is only checked for consistency so a mixed-up call fails loudly."""
    try:
        module = _BY_STATE[type(state)]
    except KeyError:
        raise TypeError(f"not a game state: {type(state).__name__}") from None
    if game is None:
        return module
    if isinstance(game, str):
        named = _BY_NAME.get(game) or _BY_NAME.get(game.lower())
        if named is None:
            raise ValueError(f"unknown game {game!r}; expected one of {sorted(_BY_NAME)}")
    else:
        unwrapped = getattr(game, "unwrapped", game)
        name = getattr(unwrapped, "game_name", None)
        if name not in _BY_NAME:
            raise TypeError(f"cannot tell which game {game!r} is")
        named = _BY_NAME[name]
    if named is not module:
        raise ValueError(f"state {type(state).__name__} does not belong to game {game!r}")
    return module


def shortest_solution(game: Any, state: Any) -> list[str] | None:
    """Shortest list of action words from ``state`` to success; ``[]`` if already solved,
    None if unsolvable (including a lost Frozen Lake state)."""
    rules = _game_module(game, state)
    if rules.is_solved(state):
        return []
    if rules.is_lost(state):
        return None
    parent: dict[Any, tuple[Any, int] | None] = {state: None}
    queue = deque([state])
    while queue:
        current = queue.popleft()
        for a in range(len(ACTIONS)):
            t = rules.transition(current, a)
            if t.state in parent:
                continue
            parent[t.state] = (current, a)
            if t.terminated and t.reward > 0:
                path, node = [], t.state
                while parent[node] is not None:
                    prev, act = parent[node]
                    path.append(ACTIONS[act])
                    node = prev
                return path[::-1]
            if not t.terminated:
                queue.append(t.state)
    return None


def solution_length(game: Any, state: Any) -> int | None:
    """Number of moves of a shortest solution, or None if unsolvable."""
    path = shortest_solution(game, state)
    return None if path is None else len(path)


def optimal_actions(game: Any, state: Any) -> set[str]:
    """Every action word that starts *some* shortest solution (empty if unsolvable or over).

    Level-synchronous BFS carrying, per state, the set of first actions that reach it at
    minimal depth; the first level that hits success gives the answer.
    """
    rules = _game_module(game, state)
    if rules.is_solved(state) or rules.is_lost(state):
        return set()
    seen = {state}
    frontier: dict[Any, set[str]] = {}
    winners: set[str] = set()
    for a, word in enumerate(ACTIONS):
        t = rules.transition(state, a)
        if t.terminated and t.reward > 0:
            winners.add(word)
        elif not t.terminated and t.state not in seen:
            frontier.setdefault(t.state, set()).add(word)
    while not winners and frontier:
        seen.update(frontier)
        nxt: dict[Any, set[str]] = {}
        for current, firsts in frontier.items():
            for a in range(len(ACTIONS)):
                t = rules.transition(current, a)
                if t.terminated and t.reward > 0:
                    winners |= firsts
                elif not t.terminated and t.state not in seen:
                    nxt.setdefault(t.state, set()).update(firsts)
        frontier = nxt
    return winners
