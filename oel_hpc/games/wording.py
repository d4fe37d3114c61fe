"""The rules a wording table must keep (every key of the default, known placeholders only, one distinct character
per board symbol). A leaf: the env classes and the text protocol check their own section with it, and
games/text.py checks a whole table."""
from __future__ import annotations

import string
from typing import Any, Mapping

from oel_hpc.errors import ConfigError


class TextTableError(ConfigError):
    """A wording table breaks a rule; `key` is the dotted path inside the table."""


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


def check_section(name: str, given: Any, default: Mapping[str, Any]) -> None:
    """One section (``log`` or a game's) against its defaults; raises TextTableError naming the key."""
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
