"""Frozen Lake 3×3: the paper's small grid-navigation game.

Rules (docs/design.md): 3×3 grid, the player starts top-left, the goal is bottom-right, exactly two
holes lie among the other seven cells, resampled until a hole-free path exists. Falling into a
hole ends the game with reward 0; reaching the goal ends it with reward 1. Moving off the grid
leaves the player in place but still counts as a move (the text protocol counts model calls);
textarena calls it an invalid move, which the protocol's ``invalid_move_limit`` counts.

Boards: ``generate`` is this project's generator; ``textarena_boards.frozen_lake`` deals textarena
0.7.4's map for a seed (``env.generator=textarena``). Both draw the 2 holes uniformly among the
solvable pairs; only which seed gives which map differs.

Board text, one row per line, cells separated by single spaces. Default symbols (``SYMBOLS``;
``prompts.game_text`` can replace them), deliberately *not* told to the model: inferring them is
what experience is for:

    P  player            _  frozen (safe) cell
    H  hole              G  goal

e.g. ``"P _ H\\n_ _ _\\nH _ G"``. When the player stands on the goal or in a hole, the cell shows
``P`` and the message says what happened.

Game logic lives in pure functions of an immutable :class:`FrozenLakeState` so the env, the
BFS solver (``solvers.py``) and any offline re-play share one implementation.
"""

from __future__ import annotations

from typing import NamedTuple

from .parsing import ACTIONS

SIZE = 3
N_HOLES = 2
START = (0, 0)
GOAL = (SIZE - 1, SIZE - 1)
CHARSET = "PHG_ \n"
#: length of a rendered board: SIZE rows of (2*SIZE-1) chars plus SIZE-1 newlines.
BOARD_CHARS = SIZE * (2 * SIZE - 1) + SIZE - 1

MOVES: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}

MSG_RESET = "New game."  # info only: the model never sees it
MSG_MOVED = "You moved {direction}."
MSG_EDGE = "You hit the edge and stayed in place."
MSG_HOLE = "You fell into a hole. Game over."
MSG_GOAL = "You reached the goal!"
#: The default wording of each move's message and the board symbols; `prompts.game_text.frozenlake` replaces them
#: (see games/text.py for the rules a replacement must pass). Every message may use {direction}.
TEXT = {"moved": MSG_MOVED, "edge": MSG_EDGE, "hole": MSG_HOLE, "goal": MSG_GOAL}
SYMBOLS = {"player": "P", "hole": "H", "goal": "G", "frozen": "_"}


class FrozenLakeState(NamedTuple):
    """Complete, hashable game state: the solver needs nothing else."""

    player: tuple[int, int]
    holes: tuple[tuple[int, int], ...]
    size: int = SIZE

    @property
    def goal(self) -> tuple[int, int]:
        return (self.size - 1, self.size - 1)


class Transition(NamedTuple):
    state: FrozenLakeState
    reward: float
    terminated: bool
    message: str
    blocked: bool = False  # the move was refused (off the grid): textarena counts it as an invalid move
    end_reason: str | None = None  # "goal" | "hole" when this move ends the game


def is_solved(state: FrozenLakeState) -> bool:
    return state.player == state.goal


def is_lost(state: FrozenLakeState) -> bool:
    return state.player in state.holes


def transition(state: FrozenLakeState, action: int, text: dict[str, str] = TEXT) -> Transition:
    """Apply one action id (index into ``ACTIONS``) to a non-terminal state; messages worded by ``text``."""
    word = ACTIONS[action]
    dr, dc = MOVES[word]
    r, c = state.player[0] + dr, state.player[1] + dc
    if not (0 <= r < state.size and 0 <= c < state.size):
        return Transition(state, 0.0, False, text["edge"].format(direction=word), blocked=True)
    new = state._replace(player=(r, c))
    if is_lost(new):
        return Transition(new, 0.0, True, text["hole"].format(direction=word), end_reason="hole")
    if is_solved(new):
        return Transition(new, 1.0, True, text["goal"].format(direction=word), end_reason="goal")
    return Transition(new, 0.0, False, text["moved"].format(direction=word))


def render(state: FrozenLakeState, symbols: dict[str, str] = SYMBOLS) -> str:
    rows = []
    for r in range(state.size):
        row = []
        for c in range(state.size):
            cell = (r, c)
            if cell == state.player:
                row.append(symbols["player"])
            elif cell in state.holes:
                row.append(symbols["hole"])
            elif cell == state.goal:
                row.append(symbols["goal"])
            else:
                row.append(symbols["frozen"])
        rows.append(" ".join(row))
    return "\n".join(rows)


def path_exists(holes: tuple[tuple[int, int], ...], size: int = SIZE) -> bool:
    """Flood fill from the start avoiding holes (kept separate from the BFS solver on purpose,
    so the solver's tests check the generator independently)."""
    goal = (size - 1, size - 1)
    seen, stack = {START}, [START]
    while stack:
        r, c = stack.pop()
        if (r, c) == goal:
            return True
        for dr, dc in MOVES.values():
            n = (r + dr, c + dc)
            if 0 <= n[0] < size and 0 <= n[1] < size and n not in holes and n not in seen:
                seen.add(n)
                stack.append(n)
    return False


def generate(rng) -> FrozenLakeState:
    """Sample a map from a numpy Generator; resample the holes until the goal is reachable."""
    cells = [(r, c) for r in range(SIZE) for c in range(SIZE) if (r, c) not in (START, GOAL)]
    while True:
        idx = rng.choice(len(cells), size=N_HOLES, replace=False)
        holes = tuple(sorted(cells[int(i)] for i in idx))
        if path_exists(holes):
            return FrozenLakeState(player=START, holes=holes)
