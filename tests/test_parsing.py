"""The protocol's action rule: last bracketed action anywhere, aliases, robustness, linear time."""

from __future__ import annotations

import random
import time

import pytest

from oel_hpc.games import action_id, parse_action


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[up]", "up"),
        ("[down]", "down"),
        ("[left]", "left"),
        ("[right]", "right"),
        ("[w]", "up"),
        ("[s]", "down"),
        ("[a]", "left"),
        ("[d]", "right"),
        ("[UP]", "up"),
        ("[ Up ]", "up"),
        ("[\tD\n]", "right"),
        ("I think... [left] no wait [right]", "right"),
        ("[right] then [w] and finally text after it.", "up"),
        ("<think>go [down]</think> Answer: [left]", "left"),
        ("<think>answer is [down]</think>", "down"),
        ("[[up]]", "up"),
        ("[up", None),
        ("up]", None),
        ("[[left] [", "left"),
        ("]][down][[", "down"),
        ("[upward]", None),
        ("[upward] [up]", "up"),
        ("[up] [upward]", "up"),
        ("[u]", None),
        ("[up down]", None),
        ("(up) {down} <left>", None),
        ("", None),
        ("no action here", None),
        ("[ri ght]", None),
    ],
)
def test_parse_action(text, expected):
    assert parse_action(text) == expected


def test_parse_action_rejects_non_str():
    with pytest.raises(TypeError):
        parse_action(None)  # type: ignore[arg-type]


def test_action_id():
    assert action_id("up") == 0 and action_id("D") == 3 and action_id(" left ") == 2
    with pytest.raises(ValueError):
        action_id("jump")


def test_linear_time_on_megabyte_garbage():
    rng = random.Random(0)
    alphabet = "[] \t\nupdownleftrightwasd{}()<>xyz"
    garbage = "".join(rng.choice(alphabet) for _ in range(1_000_000))
    adversarial = [
        "[" + " " * 1_000_000,
        "[ " * 500_000,
        "[up" + " " * 1_000_000,
        "[" * 1_000_000,
        "[up]" * 250_000 + "[left]",
    ]
    for text in [garbage, *adversarial]:
        start = time.perf_counter()
        parse_action(text)
        assert time.perf_counter() - start < 1.0
    assert parse_action(adversarial[-1]) == "left"
    assert parse_action(garbage + "[ d ]" + "zzz" * 1000) == "right"
