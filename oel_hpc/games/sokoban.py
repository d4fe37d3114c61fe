"""Sokoban 6×6: the paper's small box-pushing puzzle.

Rules (docs/design.md): a 6×6 room including its border walls, one box, one target. The player moves
one cell per action and pushes the box by walking into it, if the cell behind the box is free
(a wall blocks the push; boxes cannot be pulled). The puzzle is solved (terminated, reward 1)
when the box is on the target. There is no losing state, only running out of calls.

Rooms come from *reverse play*: start solved (box on target, player next to it) and random-walk
the player, who *pulls* the box when stepping straight away from it. Every reverse step undoes
into a legal forward step, so every room is solvable by construction. ``WALK_STEPS``,
``PULL_PROB`` and ``MAX_INTERIOR_WALLS`` are tuned so ≈88 % of rooms (seeds 0..999: 88.1 %) are
solvable within 5 moves, like the paper generator's ≈88 % (see ``tests/test_games.py``);
a room is never generated already solved. This is the ``oel`` generator; ``env.generator=textarena``
deals textarena 0.7.4's rooms instead (``textarena_boards.sokoban``, the authors' boards, with more
1-move rooms: 31 % of the authors' 128 held-out rooms, 19 % of this generator's rooms for the same
seeds). A push into a wall and a walk into one leave the state unchanged; textarena calls both
invalid moves.

Board text, one row per line, cells separated by single spaces. Default symbols (``SYMBOLS``;
``prompts.game_text`` can replace them), deliberately *not* told to the model:

    #  wall        _  floor        P  player       X  box
    O  target      √  box on target                S  player standing on the target

e.g. ::

    # # # # # #
    # _ _ # _ #
    # _ X _ _ #
    # P _ O _ #
    # _ _ _ _ #
    # # # # # #

Game logic lives in pure functions of an immutable :class:`SokobanState`, shared by the env
and the BFS solver.
"""

from __future__ import annotations

from typing import NamedTuple

from .parsing import ACTIONS

SIZE = 6
CHARSET = "#_PXO√S \n"
BOARD_CHARS = SIZE * (2 * SIZE - 1) + SIZE - 1

#: reverse-walk length and the chance that a step away from an adjacent box pulls it.
WALK_STEPS = 18
PULL_PROB = 1.0
#: interior walls are drawn uniformly from 0..MAX_INTERIOR_WALLS (floor must stay connected).
MAX_INTERIOR_WALLS = 3

MOVES: dict[str, tuple[int, int]] = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}

MSG_RESET = "New game."  # info only: the model never sees it
MSG_MOVED = "You moved {direction}."
MSG_PUSHED = "You pushed the box {direction}."
MSG_WALL = "A wall blocks the way."
MSG_BLOCKED = "The box cannot move that way."
MSG_SOLVED = "You pushed the box onto the target. Puzzle solved!"
#: The default wording of each move's message and the board symbols; `prompts.game_text.sokoban` replaces them
#: (see games/text.py for the rules a replacement must pass). Every message may use {direction}.
TEXT = {"moved": MSG_MOVED, "pushed": MSG_PUSHED, "wall": MSG_WALL, "box_blocked": MSG_BLOCKED,
        "solved": MSG_SOLVED}
SYMBOLS = {"wall": "#", "floor": "_", "player": "P", "box": "X", "target": "O", "box_on_target": "√",
           "player_on_target": "S"}

Cell = tuple[int, int]


class SokobanState(NamedTuple):
    """Complete, hashable game state. ``grid`` holds the static walls: rows of ``#`` / ``_``."""

    grid: tuple[str, ...]
    target: Cell
    box: Cell
    player: Cell

    def is_wall(self, cell: Cell) -> bool:
        return self.grid[cell[0]][cell[1]] == "#"


class Transition(NamedTuple):
    state: SokobanState
    reward: float
    terminated: bool
    message: str
    blocked: bool = False  # the move was refused (wall, unpushable box): textarena counts it as an invalid move
    end_reason: str | None = None  # "goal" when this move solves the puzzle


def is_solved(state: SokobanState) -> bool:
    return state.box == state.target


def is_lost(state: SokobanState) -> bool:  # noqa: ARG001 - same interface as frozen_lake
    return False


def transition(state: SokobanState, action: int, text: dict[str, str] = TEXT) -> Transition:
    """Apply one action id (index into ``ACTIONS``) with standard push rules; messages worded by ``text``."""
    word = ACTIONS[action]
    dr, dc = MOVES[word]
    nxt = (state.player[0] + dr, state.player[1] + dc)
    if state.is_wall(nxt):
        return Transition(state, 0.0, False, text["wall"].format(direction=word), blocked=True)
    if nxt != state.box:
        return Transition(state._replace(player=nxt), 0.0, False, text["moved"].format(direction=word))
    behind = (nxt[0] + dr, nxt[1] + dc)
    if state.is_wall(behind):
        return Transition(state, 0.0, False, text["box_blocked"].format(direction=word), blocked=True)
    new = state._replace(player=nxt, box=behind)
    if is_solved(new):
        return Transition(new, 1.0, True, text["solved"].format(direction=word), end_reason="goal")
    return Transition(new, 0.0, False, text["pushed"].format(direction=word))


def render(state: SokobanState, symbols: dict[str, str] = SYMBOLS) -> str:
    rows = []
    for r, line in enumerate(state.grid):
        row = []
        for c, ch in enumerate(line):
            cell = (r, c)
            if ch == "#":
                row.append(symbols["wall"])
            elif cell == state.box:
                row.append(symbols["box_on_target" if cell == state.target else "box"])
            elif cell == state.player:
                row.append(symbols["player_on_target" if cell == state.target else "player"])
            elif cell == state.target:
                row.append(symbols["target"])
            else:
                row.append(symbols["floor"])
        rows.append(" ".join(row))
    return "\n".join(rows)


def _connected(floor: list[Cell]) -> bool:
    cells = set(floor)
    seen, stack = {floor[0]}, [floor[0]]
    while stack:
        r, c = stack.pop()
        for dr, dc in MOVES.values():
            n = (r + dr, c + dc)
            if n in cells and n not in seen:
                seen.add(n)
                stack.append(n)
    return len(seen) == len(cells)


def generate(
    rng,
    *,
    size: int = SIZE,
    walk_steps: int = WALK_STEPS,
    pull_prob: float = PULL_PROB,
    max_interior_walls: int = MAX_INTERIOR_WALLS,
) -> SokobanState:
    """Sample a solvable, unsolved room by reverse play from a numpy Generator."""
    interior = [(r, c) for r in range(1, size - 1) for c in range(1, size - 1)]
    deltas = list(MOVES.values())
    while True:
        n_walls = int(rng.integers(0, max_interior_walls + 1))
        picked = rng.choice(len(interior), size=n_walls, replace=False)
        walls = {interior[int(i)] for i in picked}
        floor = [cell for cell in interior if cell not in walls]
        if not _connected(floor):
            continue
        target = floor[int(rng.integers(len(floor)))]
        box = target
        starts = [(box[0] + dr, box[1] + dc) for dr, dc in deltas]
        starts = [cell for cell in starts if cell in floor]
        if not starts:
            continue
        player = starts[int(rng.integers(len(starts)))]
        floor_set = set(floor)
        for _ in range(walk_steps):
            dr, dc = deltas[int(rng.integers(4))]
            nxt = (player[0] + dr, player[1] + dc)
            if nxt not in floor_set or nxt == box:
                continue
            pulled = rng.random() < pull_prob  # drawn every move so the stream is uniform
            if pulled and box == (player[0] - dr, player[1] - dc):
                box = player
            player = nxt
        if box == target:
            continue
        grid = tuple(
            "".join("_" if (r, c) in floor_set else "#" for c in range(size)) for r in range(size)
        )
        return SokobanState(grid=grid, target=target, box=box, player=player)
