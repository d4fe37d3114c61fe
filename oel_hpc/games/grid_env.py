"""The gymnasium side shared by both games: each game module supplies pure functions of an immutable state
(`generate`, `transition`, `render`); this class wraps them in the env API exactly."""

from __future__ import annotations

from types import ModuleType

import gymnasium
from gymnasium import spaces

from .parsing import ACTIONS


class GridGameEnv(gymnasium.Env):
    """``Discrete(4)`` actions (``ACTIONS`` order), board-text observations; ``info`` carries ``"message"`` (a short
    factual game message) and ``"state"`` (the hashable state the solver reads). The board is a pure function of
    the reset seed. ``text`` words the messages and picks the board symbols: the game's section of a wording table
    (``{"symbols": {...}, <message>: ...}``, see games/text.py); default the game module's ``TEXT`` and
    ``SYMBOLS``."""

    metadata = {"render_modes": ["ansi"], "render_fps": 1}
    game_name: str
    rules: ModuleType  # the game module: generate(rng), transition(state, action, text), render(state, symbols), ...

    def __init__(self, render_mode: str | None = None, text: dict | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(f"render_mode must be None or 'ansi', got {render_mode!r}")
        from .text import check_section  # text.py imports the game modules, which import this one

        table = {"symbols": self.rules.SYMBOLS, **self.rules.TEXT} if text is None else text
        check_section(self.game_name, table)
        self.symbols = dict(table["symbols"])
        self.messages = {k: v for k, v in table.items() if k != "symbols"}
        self.render_mode = render_mode
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
        return board, t.reward, t.terminated, False, {"message": t.message, "state": t.state}

    def render(self) -> str:
        return self.rules.render(self.state, self.symbols)
