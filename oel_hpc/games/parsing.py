"""Action parsing: the protocol's single rule for turning a model response into a move.

The protocol (docs/design.md): the action is the **last** bracketed action anywhere in the response, reasoning
(``<think>…</think>``) included; a response without one is an invalid move. Keeping the rule
in one function means rollouts, tests and any offline re-scoring of saved responses agree.

Accepted spellings (case-insensitive, whitespace inside the brackets allowed):
``[up] [down] [left] [right]`` and the WASD keys ``[w] [s] [a] [d]``
(w=up, s=down, a=left, d=right). ``[upward]``, ``[u]`` or ``[up down]`` are not actions.

The regex has no nested quantifiers, so ``finditer`` is linear in the input length even on
megabytes of garbage or unbalanced brackets (a thinking model can emit very long text).
"""

from __future__ import annotations

import re

#: Canonical action words; the index is the gymnasium action id of both games.
ACTIONS: tuple[str, ...] = ("up", "down", "left", "right")

#: Every accepted spelling (lower-case) → canonical word.
ALIASES: dict[str, str] = {
    "up": "up",
    "down": "down",
    "left": "left",
    "right": "right",
    "w": "up",
    "s": "down",
    "a": "left",
    "d": "right",
}

_ACTION_RE = re.compile(r"\[\s*(up|down|left|right|w|a|s|d)\s*\]", re.IGNORECASE)


def parse_action(text: str) -> str | None:
    """Return the canonical word of the last bracketed action in ``text``, or None.

    >>> parse_action("I think [left]... no wait, [ D ] is better.")
    'right'
    >>> parse_action("[upward]") is None
    True
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_action expects str, got {type(text).__name__}")
    last = None
    for last in _ACTION_RE.finditer(text):
        pass
    if last is None:
        return None
    return ALIASES[last.group(1).lower()]


def action_id(word: str) -> int:
    """Gymnasium action id of a canonical word or alias (``"right"`` or ``"d"`` → 3)."""
    try:
        return ACTIONS.index(ALIASES[word.strip().lower()])
    except KeyError:
        raise ValueError(f"unknown action {word!r}; expected one of {sorted(ALIASES)}") from None
