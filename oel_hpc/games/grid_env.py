"""The gymnasium side shared by both games: each game module supplies pure functions of an immutable state
(`generate`, `transition`, `render`); this class wraps them in the env API exactly.

Two board generators (``generator=``): ``oel``, this project's own (``rules.generate`` on the env's numpy
generator), and ``textarena``, the authors' game library's boards re-implemented seed for seed
(``textarena_boards.py``)."""

from __future__ import annotations

from types import ModuleType
from typing import Callable

import gymnasium
from gymnasium import spaces

from .parsing import ACTIONS
from .wording import check_section

GENERATORS = ("oel", "textarena")


class GridGameEnv(gymnasium.Env):
    """``Discrete(4)`` actions (``ACTIONS`` order), board-text observations; ``info`` carries ``"message"`` (a short
    factual game message in the table's words), ``"state"`` (the hashable state the solver reads), ``"blocked"``
    (the game refused the move: edge, wall or an unpushable box; textarena calls that an invalid move) and
    ``"end_reason"`` (``"goal"`` or ``"hole"`` on the move that ends the game, else None). The board is a pure
    function of the reset seed and the generator. ``text`` words the messages and picks the board symbols: the
    game's section of a wording table (``{"symbols": {...}, <message>: ...}``, see games/text.py); default the
    game module's ``TEXT`` and ``SYMBOLS``."""

    metadata = {"render_modes": ["ansi"], "render_fps": 1}
    game_name: str
    rules: ModuleType  # the game module: generate(rng), transition(state, action, text), render(state, symbols), ...
    textarena_board: Callable  # seed → the state textarena 0.7.4 builds for that seed (staticmethod)

    def __init__(self, render_mode: str | None = None, generator: str = "oel", text: dict | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        if generator not in GENERATORS:
            raise ValueError(f"generator must be one of {GENERATORS}, got {generator!r}")
        table = {"symbols": self.rules.SYMBOLS, **self.rules.TEXT} if text is None else text
        check_section(self.game_name, table, {"symbols": self.rules.SYMBOLS, **self.rules.TEXT})
        self.symbols = dict(table["symbols"])
        self.messages = {k: v for k, v in table.items() if k != "symbols"}
        self.render_mode = render_mode
        self.generator = generator
        self.action_space = spaces.Discrete(len(ACTIONS))
        chars = self.rules.BOARD_CHARS
        charset = "".join(self.symbols.values()) + " \n"
        self.observation_space = spaces.Text(max_length=chars, min_length=chars, charset=charset)
        self._state = None
        self._done = False

    @property
    def state(self):
        if self._state is None:
            raise RuntimeError("call reset() first")
        return self._state

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        if self.generator == "textarena":
            # textarena seeds its generators with the game seed itself; an unseeded reset draws one from the
            # env's generator, so reset() after reset(seed=s) is still reproducible
            board_seed = seed if seed is not None else int(self.np_random.integers(2**32))
            self._state = self.textarena_board(board_seed)
        else:
            self._state = self.rules.generate(self.np_random)
        self._done = False
        return self.rules.render(self._state, self.symbols), {"message": self.rules.MSG_RESET, "state": self._state}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if self._done:
            raise RuntimeError("the game is over; call reset()")
        if not self.action_space.contains(action):
            raise ValueError(f"invalid action {action!r}; expected an int in [0, {len(ACTIONS)})")
        t = self.rules.transition(self._state, int(action), self.messages)
        self._state, self._done = t.state, t.terminated
        board = self.rules.render(t.state, self.symbols)
        info = {"message": t.message, "state": t.state, "blocked": t.blocked, "end_reason": t.end_reason}
        return board, t.reward, t.terminated, False, info

    def render(self) -> str:
        return self.rules.render(self.state, self.symbols)
