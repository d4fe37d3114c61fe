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

import string
from typing import Any, Mapping

from oel_hpc.errors import ConfigError

from . import frozen_lake, sokoban
from .protocol import END_REASONS, LOG_TEXT

GAME_MODULES = {"frozenlake": frozen_lake, "sokoban": sokoban}
__all__ = ["END_REASONS", "GAME_MODULES", "TextTableError", "check_game_text", "check_section", "default_game_text"]


class TextTableError(ConfigError):
    """A wording table breaks a rule; `key` is the dotted path inside the table."""


def default_game_text() -> dict[str, dict[str, Any]]:
    """The whole default table (a fresh copy)."""
    table: dict[str, dict[str, Any]] = {"log": dict(LOG_TEXT)}
    for name, module in GAME_MODULES.items():
        table[name] = {"symbols": dict(module.SYMBOLS), **module.TEXT}
    return table


def _fields(key: str, text: str) -> set[str]:
    try:
        return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}
    except ValueError as e:
        raise TextTableError(key, f"is not a valid template ({e}); write literal braces as {{{{ }}}}") from None


def _join(key: str, sub: str) -> str:
    return f"{key}.{sub}" if key else sub


def _check_keys(key: str, given: Any, default: Mapping) -> None:
    if not isinstance(given, Mapping):
        raise TextTableError(key, f"must be a mapping with the keys {sorted(default)}, got {type(given).__name__}")
    unknown, missing = set(given) - set(default), set(default) - set(given)
    if unknown:
        raise TextTableError(_join(key, sorted(unknown)[0]), f"unknown key (allowed: {', '.join(sorted(default))})")
    if missing:
        raise TextTableError(_join(key, sorted(missing)[0]), "missing (every key of the default table is needed)")


def check_section(name: str, given: Any) -> None:
    """One section (``log`` or a game's) against its defaults; raises TextTableError naming the key."""
    default = default_game_text()[name]
    _check_keys(name, given, default)
    for key, text in given.items():
        if key == "symbols":
            continue
        where = f"{name}.{key}"
        if not isinstance(text, str) or not text.strip():
            raise TextTableError(where, f"must be a non-empty string, got {text!r}")
        allowed = _fields(where, default[key]) | ({"direction"} if name != "log" else set())
        unknown = _fields(where, text) - allowed
        if unknown:
            raise TextTableError(where, f"unknown placeholder(s) {sorted(unknown)}; allowed {sorted(allowed)}")
    if "symbols" in default:
        _check_keys(f"{name}.symbols", given["symbols"], default["symbols"])
        seen: dict[str, str] = {}
        for key, symbol in given["symbols"].items():
            where = f"{name}.symbols.{key}"
            if not isinstance(symbol, str) or len(symbol) != 1 or symbol == "\n":
                raise TextTableError(where, f"must be one character (not a newline), got {symbol!r}")
            if symbol in seen:
                raise TextTableError(where, f"{symbol!r} is also the symbol of {seen[symbol]}: a board would be "
                                            "ambiguous")
            seen[symbol] = key


def check_game_text(table: Any) -> None:
    """A whole table: the log section and one per game. Keys in errors are relative to the table ("" = itself)."""
    default = default_game_text()
    _check_keys("", table, default)
    for name in default:
        check_section(name, table[name])

