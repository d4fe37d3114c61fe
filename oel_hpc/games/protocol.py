"""The text protocol: one model call = one ``TextGame.step(response_text)`` (docs/design.md).

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

textarena's rule, optional (``invalid_move_limit``, the authors' library: 2): that many *consecutive* invalid
moves end the game, lost. An invalid move is a response without an action or a move the game refuses (edge,
wall, unpushable box); a valid move resets the count. The block of the call that ends a game so says
``Too many invalid moves in a row. Game over.`` (``LOG_TEXT["invalid_limit"]``) before ``Final board:``.
``None`` (the default) never ends a game that way, and the log then reads exactly as without the rule. Every
call still counts against ``max_calls``, as the authors' rollout counts them.

How a game ended is in the last step's ``info["end_reason"]``, a code of :data:`END_REASONS` (``goal``,
``hole``, ``invalid_moves``, ``turn_limit`` = the call budget ran out), None while the game runs; the code, not
any wording, so whoever shows it to a model words it (``prompts.end_reasons``).
"""

from __future__ import annotations

import string
from typing import Any, SupportsFloat

import gymnasium
from gymnasium import spaces

from .parsing import ACTIONS, parse_action
from .wording import check_section

LOG_SEPARATOR = "\n\n"
MSG_INVALID = "Invalid action."
MSG_OUT_OF_CALLS = "Out of moves. Game over."
MSG_INVALID_LIMIT = "Too many invalid moves in a row. Game over."
#: The game log's default wording; a prompt set replaces it (prompts.game_text.log).
LOG_TEXT = {
    "turn_heading": "Turn {turn}:",
    "final_heading": "Final board:",
    "action": "Action: [{action}]",
    "invalid": MSG_INVALID,
    "out_of_moves": MSG_OUT_OF_CALLS,
    "invalid_limit": MSG_INVALID_LIMIT,
}
#: Why a finished game ended: the goal reached, a hole, too many invalid moves in a row (invalid_move_limit), the
#: call budget used up. The games report the first two (their step info's ``end_reason``), the protocol the others.
END_REASONS = ("goal", "hole", "invalid_moves", "turn_limit")
#: Why a call was an invalid move: the response held no action, or the game refused the move (edge, wall, box).
INVALID_REASONS = ("no_action", "refused")
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
    ``action`` (canonical word or None), ``valid`` (an action was found), ``message``, ``state``, ``calls``,
    ``success``, ``invalid_move`` (no action, or the game refused the move), ``invalid_reason`` (a code of
    :data:`INVALID_REASONS`, else None) and ``end_reason`` (a code of :data:`END_REASONS` once the game is over,
    else None). Stepping a finished game raises ``RuntimeError``. ``text`` words the log (default
    :data:`LOG_TEXT`).
    """

    def __init__(self, env: gymnasium.Env, max_calls: int = 5, invalid_move_limit: int | None = None,
                 text: dict[str, str] | None = None):
        super().__init__(env)
        if not isinstance(max_calls, int) or max_calls < 1:
            raise ValueError(f"max_calls must be a positive int, got {max_calls!r}")
        if invalid_move_limit is not None and (
            isinstance(invalid_move_limit, bool) or not isinstance(invalid_move_limit, int) or invalid_move_limit < 1
        ):
            raise ValueError(f"invalid_move_limit must be a positive int or None, got {invalid_move_limit!r}")
        self._text = dict(LOG_TEXT if text is None else text)
        check_section("log", self._text, LOG_TEXT)
        self.max_calls = max_calls
        self.invalid_move_limit = invalid_move_limit
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
        self._invalid_streak = 0
        self._end_reason: str | None = None

    # -- gymnasium API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        board, info = self.env.reset(seed=seed, options=options)
        self._board, self._state = board, info.get("state")
        self._blocks = [f"{self._text['turn_heading'].format(turn=1)}\n{board}"]
        self._actions = []
        self._terminated = self._truncated = self._success = False
        self._invalid_streak = 0
        self._end_reason = None
        info = dict(info, action=None, valid=True, calls=0, success=False, invalid_move=False,
                    invalid_reason=None, end_reason=None)
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
            invalid_reason: str | None = "no_action"
        else:
            board, reward, terminated, env_truncated, extra = self.env.step(ACTIONS.index(word))
            self._board, self._state = board, extra.get("state")
            message = extra.get("message", "")
            lines = [self._text["action"].format(action=word), message]
            invalid_reason = "refused" if extra.get("blocked") else None
        self._invalid_streak = self._invalid_streak + 1 if invalid_reason is not None else 0
        terminated = bool(terminated)
        success = terminated and float(reward) > 0
        if terminated:
            end_reason = extra.get("end_reason")
            if end_reason not in ("goal", "hole"):
                raise RuntimeError(f"the game ended without a known end_reason in its step info: {end_reason!r}")
        elif self.invalid_move_limit is not None and self._invalid_streak >= self.invalid_move_limit:
            # textarena ends the game on this call, even when it is also the last one the budget allows
            terminated, end_reason = True, "invalid_moves"
            lines.append(self._text["invalid_limit"])
        else:
            end_reason = None
        truncated = not terminated and (env_truncated or self.calls >= self.max_calls)
        if truncated:
            lines.append(self._text["out_of_moves"])
            end_reason = "turn_limit"
        self._end_reason = end_reason
        if terminated or truncated:
            heading = self._text["final_heading"]
        else:
            heading = self._text["turn_heading"].format(turn=self.calls + 1)
        lines += [heading, self._board]
        self._blocks.append("\n".join(lines))
        self._terminated, self._truncated, self._success = terminated, truncated, success
        info = dict(
            extra,
            action=word,
            valid=word is not None,
            message=message,
            state=self._state,
            calls=self.calls,
            success=success,
            invalid_move=invalid_reason is not None,
            invalid_reason=invalid_reason,
            end_reason=end_reason,
        )
        return self.game_log, 1.0 if success else 0.0, terminated, truncated, info

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
    def end_reason(self) -> str | None:
        """How the game ended, a code of :data:`END_REASONS`; None while it runs."""
        return self._end_reason

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
