"""Boards identical to textarena 0.7.4's for the same seed (``env.generator=textarena``).

The paper's authors played textarena's ``FrozenLake-v0-raw`` (size 3, 2 holes, fixed start and goal) and
``Sokoban-v0`` (6×6 room, 1 box). Reproducing their held-out set, their extraction games and their deployment
games needs the same board for the same seed, so this module re-implements textarena's two generators with the
same random-number consumption, call for call; textarena itself is never imported here (the parity test
``tests/test_textarena_parity.py`` compares the two when textarena is installed).

What textarena does, and so what this code must do:

* Frozen Lake seeds Python's global ``random`` with the game seed (``random.seed(seed)``, the same stream as
  ``random.Random(seed)``), then draws ``random.sample(cells, 2)`` from the 7 cells other than start and goal
  (row-major) until start and goal are connected, at most 100 times, then falls back to holes off an L path.
* Sokoban (the gym-sokoban generator, as textarena patched it) builds a room with ``random.Random(seed)``: a
  20-step random walk (``int(1.7 * (6 + 6))``) stamping one of five 3×3 masks; then, with
  ``numpy.random.default_rng(seed)``, one draw places the player and one the box target among the floor cells;
  then a depth-first *reverse play* from the solved room (the player walks and pulls the box) keeps the state
  with the highest ``pulls × box displacement``; the room is kept if that score is positive and the box does not
  sit on a "deadlock" cell, else the next try continues the same two generators. Reset retries with
  ``seed + 1, seed + 2, ...`` only if 1000 tries fail.

textarena's quirks are reproduced on purpose, since they shape which rooms exist: its corner test counts
up+down and left+right (opposite walls) as a corner but misses up+left and down+right; the box-placement
deadlock test always passes (it marks the cell a target first); the search counts every pull as a "box swap".
"""

from __future__ import annotations

import random
from typing import Optional

import numpy as np

from .frozen_lake import FrozenLakeState, path_exists
from .sokoban import SokobanState

# -- Frozen Lake ---------------------------------------------------------------------------------------------------

_FL_MAX_ATTEMPTS = 100


def frozen_lake(seed: int, size: int = 3, num_holes: int = 2) -> FrozenLakeState:
    """textarena ``FrozenLakeEnv(size, num_holes, randomize_start_goal=False).reset(seed=seed)``'s map."""
    rng = random.Random(seed)
    start, goal = (0, 0), (size - 1, size - 1)
    cells = [(r, c) for r in range(size) for c in range(size) if (r, c) not in (start, goal)]
    n_holes = num_holes if num_holes < len(cells) else len(cells) - 1
    for _ in range(_FL_MAX_ATTEMPTS):
        holes = tuple(rng.sample(cells, n_holes))
        if path_exists(holes, size):
            return FrozenLakeState(player=start, holes=tuple(sorted(holes)), size=size)
    # textarena's fallback: a safe L path along the top row and down the last column, holes elsewhere
    safe = {(0, c) for c in range(size)} | {(r, size - 1) for r in range(size)}
    free = [(r, c) for r in range(size) for c in range(size) if (r, c) not in safe]
    holes = tuple(rng.sample(free, min(n_holes, len(free))))
    return FrozenLakeState(player=start, holes=tuple(sorted(holes)), size=size)


# -- Sokoban -------------------------------------------------------------------------------------------------------

WALL, FLOOR, TARGET, BOX_ON_TARGET, BOX, PLAYER = 0, 1, 2, 3, 4, 5

_MASKS = (
    ((0, 0, 0), (1, 1, 1), (0, 0, 0)),
    ((0, 1, 0), (0, 1, 0), (0, 1, 0)),
    ((0, 0, 0), (1, 1, 0), (0, 1, 0)),
    ((0, 0, 0), (1, 1, 0), (1, 1, 0)),
    ((0, 0, 0), (0, 1, 1), (0, 1, 0)),
)
_WALK_DIRECTIONS = ((1, 0), (0, 1), (-1, 0), (0, -1))
_MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))  # up, down, left, right: the order the search tries them
_P_CHANGE_DIRECTION = 0.35
_TRIES = 1000
_RESET_RETRIES = 50
_SEARCH_TTL = 300
_SEARCH_MAX_STATES = 300_000


class _NoRoom(Exception):
    """One generation try failed; textarena moves on to the next try."""


def _topology(rows: int, cols: int, walk_steps: int, rng: random.Random) -> list[list[int]]:
    direction = rng.sample(_WALK_DIRECTIONS, 1)[0]
    position = [rng.randint(1, rows - 1), rng.randint(1, cols - 1)]
    level = [[0] * cols for _ in range(rows)]
    for _ in range(walk_steps):
        if rng.random() < _P_CHANGE_DIRECTION:
            direction = rng.sample(_WALK_DIRECTIONS, 1)[0]
        position = [max(min(position[0] + direction[0], rows - 2), 1),
                    max(min(position[1] + direction[1], cols - 2), 1)]
        mask = rng.sample(_MASKS, 1)[0]
        for i in range(3):
            for j in range(3):
                level[position[0] - 1 + i][position[1] - 1 + j] += mask[i][j]
    return [[FLOOR if 0 < r < rows - 1 and 0 < c < cols - 1 and level[r][c] > 0 else WALL for c in range(cols)]
            for r in range(rows)]


def _floor_cells(room: list[list[int]]) -> list[tuple[int, int]]:
    return [(r, c) for r, row in enumerate(room) for c, v in enumerate(row) if v == FLOOR]  # np.where order


def _place_player_and_target(room: list[list[int]], rng: np.random.Generator) -> None:
    floor = _floor_cells(room)
    if len(floor) <= 2:  # one box + one player need more free cells (textarena raises, the try is lost)
        raise _NoRoom
    r, c = floor[int(rng.integers(len(floor)))]
    room[r][c] = PLAYER
    floor = _floor_cells(room)
    r, c = floor[int(rng.integers(len(floor)))]
    room[r][c] = TARGET  # textarena's deadlock test here always passes: it marks the cell a target first


def _is_deadlock_cell(structure: list[list[int]], r: int, c: int) -> bool:
    """textarena's ``is_deadlock_position``, index arithmetic and all (see the module docstring)."""
    if structure[r][c] == TARGET:
        return False
    walls = [i for i, (dr, dc) in enumerate(_MOVES)
             if not (0 <= r + dr < len(structure) and 0 <= c + dc < len(structure[0]))
             or structure[r + dr][c + dc] == WALL]
    if len(walls) == 2:
        return abs(walls[0] - walls[1]) in (1, 3)
    return len(walls) > 2


def _reverse_play(state: list[int], structure: list[int], cols: int, target: int) -> tuple[list[int], int]:
    """textarena's depth-first reverse play (``reverse_playing``) for one box, on flat row-major cell lists.

    Returns the best state found and its score. A state is scored and expanded only the first time it is
    reached; each call level spends one unit of a time-to-live of 300; every pull counts as a box swap."""
    explored: set[tuple[int, ...]] = set()
    best_state, best_score = state, -1
    steps = [-cols, cols, -1, 1]  # _MOVES as flat offsets

    def enter(room: list[int], box: int, pulls: int, ttl: int) -> bool:
        """Visit a state; True when its children are to be searched."""
        nonlocal best_state, best_score
        if ttl <= 0 or len(explored) >= _SEARCH_MAX_STATES:
            return False
        key = tuple(room)
        if key in explored:
            return False
        displacement = abs(box // cols - target // cols) + abs(box % cols - target % cols)
        score = pulls * displacement if room.count(TARGET) == 1 else 0
        if score > best_score:
            best_state, best_score = room, score
        explored.add(key)
        return True

    def reverse_move(room: list[int], box: int, action: int) -> tuple[list[int], int, bool]:
        room = list(room)
        player = room.index(PLAYER)
        step = steps[action]
        nxt = player + step
        pulled = False
        if room[nxt] in (FLOOR, TARGET):
            room[player] = structure[player]
            room[nxt] = PLAYER
            behind = player - step
            if room[behind] in (BOX_ON_TARGET, BOX):
                room[player] = BOX_ON_TARGET  # textarena marks every pulled box so, on a target or not
                room[behind] = structure[behind]
                box, pulled = player, True
        return room, box, pulled

    # an explicit stack instead of recursion, visiting in exactly the recursive order
    stack = []
    if enter(state, target, 0, _SEARCH_TTL - 1):
        stack.append([state, target, 0, _SEARCH_TTL - 1, 0])
    while stack:
        frame = stack[-1]
        room, box, pulls, ttl, action = frame
        if action == len(_MOVES):
            stack.pop()
            continue
        frame[4] += 1
        child, child_box, pulled = reverse_move(room, box, action)
        child_pulls = pulls + pulled
        if enter(child, child_box, child_pulls, ttl - 1):
            stack.append([child, child_box, child_pulls, ttl - 1, 0])
    return best_state, best_score


def _generate_room(rows: int, cols: int, walk_steps: int, seed: int) -> Optional[SokobanState]:
    """One ``generate_room`` call: up to 1000 tries on one pair of generators; None if all fail."""
    py_rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    for _ in range(_TRIES):
        room = _topology(rows, cols, walk_steps, py_rng)
        try:
            _place_player_and_target(room, np_rng)
        except _NoRoom:
            continue
        structure = [FLOOR if v == PLAYER else v for row in room for v in row]
        start = [BOX if v == TARGET else v for row in room for v in row]  # the box starts on its target
        target = structure.index(TARGET)
        best, score = _reverse_play(start, structure, cols, target)
        if score <= 0:
            continue
        box = best.index(BOX_ON_TARGET) if BOX_ON_TARGET in best else best.index(BOX)
        grid2d = [structure[r * cols:(r + 1) * cols] for r in range(rows)]
        if _is_deadlock_cell(grid2d, box // cols, box % cols):
            continue
        player = best.index(PLAYER)
        grid = tuple("".join("#" if v == WALL else "_" for v in row) for row in grid2d)
        return SokobanState(grid=grid, target=divmod(target, cols), box=divmod(box, cols),
                            player=divmod(player, cols))
    return None


def sokoban(seed: int, rows: int = 6, cols: int = 6) -> SokobanState:
    """textarena ``SokobanEnv(dim_room=(rows, cols), num_boxes=1).reset(seed=seed)``'s room."""
    walk_steps = int(1.7 * (rows + cols))
    for attempt in range(_RESET_RETRIES):
        state = _generate_room(rows, cols, walk_steps, seed + attempt)
        if state is not None:
            return state
    raise RuntimeError(f"no Sokoban room for seed {seed} after {_RESET_RETRIES} retries (textarena fails too)")


#: board function per game name (``GridGameEnv.game_name``)
BOARDS = {"frozenlake": frozen_lake, "sokoban": sokoban}
