"""The text protocol: one model call = one ``TextGame.step(response_text)`` (DESIGN §1).

Why a wrapper: rollouts, deploy and evaluation must all apply the *same* rules — the action is
the last bracketed action anywhere in the response, a response without one is an invalid move
that still uses up a call, at most ``max_calls`` calls, success ⇔ goal reached (reward 1/0) —
and must show the model the same **game log**: boards, game messages and earlier actions, but
never the model's own earlier responses.

The log is a list of self-contained text blocks so a prompt builder can drop the oldest ones
when a prompt exceeds its token budget. Block 0 is the initial board; each call adds one block::

    Turn 1:
    P _ H
    _ _ _
    H _ G

    Action: [right]
    You moved right.
    Turn 2:
    _ P H
    _ _ _
    H _ G

    Invalid action.
    Turn 3:
    ...

A block whose call ended the game says ``Final board:`` instead of ``Turn k:`` (after the
message, plus ``Out of moves. Game over.`` when the call budget ran out).
Blocks are joined with :data:`LOG_SEPARATOR` (use :func:`join_blocks` for a trimmed list).

That wording is the default (:data:`LOG_TEXT`); ``TextGame(env, text=...)`` takes another table with the same
keys (``prompts.game_text.log`` in the config; rules in ``games/text.py``).
"""

from __future__ import annotations

import string
from typing import Any, SupportsFloat

import gymnasium
from gymnasium import spaces

from .parsing import ACTIONS, parse_action

LOG_SEPARATOR = "\n\n"
MSG_INVALID = "Invalid action."
MSG_OUT_OF_CALLS = "Out of moves. Game over."
#: The game log's default wording; a prompt set replaces it (prompts.game_text.log).
LOG_TEXT = {
    "turn_heading": "Turn {turn}:",
    "final_heading": "Final board:",
    "action": "Action: [{action}]",
    "invalid": MSG_INVALID,
    "out_of_moves": MSG_OUT_OF_CALLS,
}
#: nominal bound on a response; the protocol never rejects a longer one.
MAX_RESPONSE_CHARS = 1_000_000
_LOG_CHARSET = frozenset(string.printable) | frozenset("√")


def join_blocks(blocks: list[str]) -> str:
    """The game-log text for a list of blocks (e.g. after dropping the oldest)."""
    return LOG_SEPARATOR.join(blocks)


class TextGame(gymnasium.Wrapper):
    """Wraps a board-text game env; actions are model responses, observations the game log.

    ``reset(seed=None, options=None) -> (game_log, info)``;
    ``step(response) -> (game_log, reward, terminated, truncated, info)`` with ``info`` holding
    ``action`` (canonical word or None), ``valid``, ``message``, ``state``, ``calls`` and
    ``success``. Stepping a finished game raises ``RuntimeError``. ``text`` words the log (default
    :data:`LOG_TEXT`).
    """

    def __init__(self, env: gymnasium.Env, max_calls: int = 5, text: dict[str, str] | None = None):
        super().__init__(env)
        if not isinstance(max_calls, int) or max_calls < 1:
            raise ValueError(f"max_calls must be a positive int, got {max_calls!r}")
        from .text import check_section  # text.py reads LOG_TEXT from this module

        self._text = dict(LOG_TEXT if text is None else text)
        check_section("log", self._text)
        self.max_calls = max_calls
        self._action_space = spaces.Text(
            max_length=MAX_RESPONSE_CHARS, min_length=0, charset=_LOG_CHARSET
        )
        board_max = getattr(env.observation_space, "max_length", 256)
        env_messages = getattr(env.unwrapped, "messages", {})
        wording = list(self._text.values()) + list(env_messages.values())
        board_chars = frozenset(getattr(env.observation_space, "character_set", ""))
        charset = _LOG_CHARSET | frozenset("".join(wording)) | board_chars
        self._observation_space = spaces.Text(
            max_length=(max_calls + 1) * (board_max + 200 + sum(map(len, wording))), charset=charset
        )
        self._blocks: list[str] = []
        self._actions: list[str | None] = []
        self._board = ""
        self._state: Any = None
        self._terminated = False
        self._truncated = False
        self._success = False

    # -- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        board, info = self.env.reset(seed=seed, options=options)
        self._board, self._state = board, info.get("state")
        self._blocks = [f"{self._text['turn_heading'].format(turn=1)}\n{board}"]
        self._actions = []
        self._terminated = self._truncated = self._success = False
        info = dict(info, action=None, valid=True, calls=0, success=False)
        return self.game_log, info

    def step(self, response: str) -> tuple[str, SupportsFloat, bool, bool, dict[str, Any]]:
        if not self._blocks:
            raise RuntimeError("call reset() before step()")
        if self.done:
            raise RuntimeError("the game is over; call reset()")
        if not isinstance(response, str):
            raise TypeError(f"response must be str, got {type(response).__name__}")
        word = parse_action(response)
        self._actions.append(word)
        env_truncated = False
        if word is None:
            lines = [self._text["invalid"]]
            message, reward, terminated = self._text["invalid"], 0.0, False
            extra: dict[str, Any] = {}
        else:
            board, reward, terminated, env_truncated, extra = self.env.step(ACTIONS.index(word))
            self._board, self._state = board, extra.get("state")
            message = extra.get("message", "")
            lines = [self._text["action"].format(action=word), message]
        success = bool(terminated) and float(reward) > 0
        truncated = not terminated and (env_truncated or self.calls >= self.max_calls)
        if truncated:
            lines.append(self._text["out_of_moves"])
        if terminated or truncated:
            heading = self._text["final_heading"]
        else:
            heading = self._text["turn_heading"].format(turn=self.calls + 1)
        lines += [heading, self._board]
        self._blocks.append("\n".join(lines))
        self._terminated, self._truncated, self._success = bool(terminated), truncated, success
        info = dict(
            extra,
            action=word,
            valid=word is not None,
            message=message,
            state=self._state,
            calls=self.calls,
            success=success,
        )
        return self.game_log, 1.0 if success else 0.0, bool(terminated), truncated, info

    def render(self) -> str:
        return self._board

    # -- protocol state ------------------------------------------------------------------------
    @property
    def log_blocks(self) -> list[str]:
        """Block 0 = initial board; then one self-contained block per call (a copy)."""
        return list(self._blocks)

    @property
    def game_log(self) -> str:
        return join_blocks(self._blocks)

    @property
    def calls(self) -> int:
        """Model calls used so far (invalid ones included)."""
        return len(self._actions)

    @property
    def actions(self) -> list[str | None]:
        """Parsed action per call (None for an invalid call)."""
        return list(self._actions)

    @property
    def success(self) -> bool:
        return self._success

    @property
    def terminated(self) -> bool:
        return self._terminated

    @property
    def truncated(self) -> bool:
        return self._truncated

    @property
    def done(self) -> bool:
        return self._terminated or self._truncated

    @property
    def board(self) -> str:
        """The current board text."""
        return self._board

    @property
    def state(self) -> Any:
        """The current hashable game state (for the solvers)."""
        return self._state

    @property
    def action_words(self) -> tuple[str, ...]:
        """How the model may write an action, for prompts: ``("[up]", "[down]", ...)``."""
        return tuple(f"[{a}]" for a in ACTIONS)
