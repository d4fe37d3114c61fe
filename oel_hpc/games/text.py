"""The games' model-visible wording as one table and the rules a table must follow.

A table has one section per game log part::

    {"log":        {"turn_heading": "Turn {turn}:", "final_heading": ..., "action": ..., "invalid": ...,
                    "out_of_moves": ..., "invalid_limit": ...},
     "frozenlake": {"symbols": {"player": "P", ...}, "moved": "You moved {direction}.", "edge": ..., ...},
     "sokoban":    {"symbols": {...}, "moved": ..., "pushed": ..., ...}}

The defaults live beside the code that uses them (``protocol.LOG_TEXT``, each game module's ``TEXT`` and
``SYMBOLS``); ``prompts.game_text`` in the config (conf/prompts/*.yaml) replaces them, and the committed
conf/prompts/default.yaml holds exactly these defaults (a test keeps the two equal).

Rules (``check_game_text``): every key of the defaults and no other; each message a non-empty string whose
placeholders are among those its default uses, plus ``{direction}`` (the move's word) in any game message; none is
required, leaving one out is a wording choice. Each symbol is one character other than a newline, distinct within
its game, so a board stays a grid that can be read cell by cell.

Why a game ended is not worded here: the protocol reports a code (``protocol.END_REASONS``, re-exported here) and
``prompts.end_reasons`` words it for the extractor.
"""
from __future__ import annotations

from typing import Any

from . import frozen_lake, sokoban, wording
from .protocol import END_REASONS, LOG_TEXT
from .wording import TextTableError, _check_keys  # noqa: F401  (TextTableError: part of this module's API)

GAME_MODULES = {"frozenlake": frozen_lake, "sokoban": sokoban}
__all__ = ["END_REASONS", "GAME_MODULES", "TextTableError", "check_game_text", "check_section", "default_game_text"]


def default_game_text() -> dict[str, dict[str, Any]]:
    """The whole default table (a fresh copy)."""
    table: dict[str, dict[str, Any]] = {"log": dict(LOG_TEXT)}
    for name, module in GAME_MODULES.items():
        table[name] = {"symbols": dict(module.SYMBOLS), **module.TEXT}
    return table


def check_section(name: str, given: Any) -> None:
    """One section (``log`` or a game's) against its defaults; raises TextTableError naming the key."""
    wording.check_section(name, given, default_game_text()[name])


def check_game_text(table: Any) -> None:
    """A whole table: the log section and one per game. Keys in errors are relative to the table ("" = itself)."""
    default = default_game_text()
    _check_keys("", table, default)
    for name in default:
        check_section(name, table[name])

