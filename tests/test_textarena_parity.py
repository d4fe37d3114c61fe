"""env.generator=textarena against textarena 0.7.4 itself: the same board for the same seed, and the same rules.

textarena is a test-only dependency (the `test` extra); without it these tests skip. The envs are made exactly as
the authors' rollout makes them (`_make_textgame_envs`: FrozenLake-v0-raw with size 3, 2 holes, fixed start and
goal; Sokoban-v0 with 1 box in a 6×6 room) and are compared on the full layout, not on a rendering.
"""
from __future__ import annotations

import collections
import random

import numpy as np
import pytest

from oel_hpc.games import FrozenLake3x3Env, Sokoban6x6Env, TextGame, deploy_seeds, extract_seed, heldout_seeds
from oel_hpc.games import textarena_boards

ta = pytest.importorskip("textarena")
if ta.__version__ != "0.7.4":
    pytest.skip(f"the boards are textarena 0.7.4's, found {ta.__version__}", allow_module_level=True)

N_SEEDS = 1000


def _paper_seeds() -> list[int]:
    """Seeds the paper runs deal: held-out, extraction (3 rounds × 100 steps), deploy (first and last step)."""
    seeds = heldout_seeds(128, "paper")
    seeds += [extract_seed(r, 0, k, scheme="paper", shared=True) for r in (1, 2, 3) for k in range(1, 101)]
    seeds += [s for r in (1, 2, 3) for k in (1, 100) for s in deploy_seeds(r, k, 128, scheme="paper")]
    return seeds


SEEDS = list(range(N_SEEDS)) + _paper_seeds()


def _ta_frozen_lake():
    return ta.make(env_id="FrozenLake-v0-raw", size=3, num_holes=2, randomize_start_goal=False)


def _ta_sokoban():
    return ta.make(env_id="Sokoban-v0", num_boxes=1, dim_room=(6, 6))


def _ta_frozen_lake_layout(env) -> dict:
    g = env.state.game_state
    grid = g["grid"]
    return {"holes": sorted((r, c) for r in range(3) for c in range(3) if grid[r][c] == "H"),
            "goal": [(r, c) for r in range(3) for c in range(3) if grid[r][c] == "G"],
            "player": tuple(g["player_pos"]), "goal_pos": tuple(g["goal_pos"])}


def _our_frozen_lake_layout(state) -> dict:
    return {"holes": sorted(state.holes), "goal": [state.goal], "player": state.player, "goal_pos": state.goal}


def _cells(array, *values) -> list[tuple[int, int]]:
    return sorted((int(r), int(c)) for r, c in np.argwhere(np.isin(array, values)))


def _ta_sokoban_layout(env) -> dict:
    fixed, room = env.room_fixed, env.room_state
    return {"walls": _cells(fixed, 0), "targets": _cells(fixed, 2), "boxes": _cells(room, 3, 4),
            "player": _cells(room, 5), "shape": fixed.shape}


def _our_sokoban_layout(state) -> dict:
    walls = sorted((r, c) for r, row in enumerate(state.grid) for c, ch in enumerate(row) if ch == "#")
    return {"walls": walls, "targets": [state.target], "boxes": [state.box], "player": [state.player],
            "shape": (len(state.grid), len(state.grid[0]))}


def test_frozen_lake_boards_identical():
    env, ours = _ta_frozen_lake(), FrozenLake3x3Env(generator="textarena")
    maps = collections.Counter()
    for seed in SEEDS:
        env.reset(num_players=1, seed=seed)
        _, info = ours.reset(seed=seed)
        assert _our_frozen_lake_layout(info["state"]) == _ta_frozen_lake_layout(env), seed
        maps[info["state"].holes] += 1
    assert len(maps) == 19  # every solvable 2-hole map occurs: the comparison is not over a degenerate set
    print(f"\nFrozen Lake: {len(SEEDS)} seeds ({N_SEEDS} consecutive + {len(SEEDS) - N_SEEDS} of the paper's), "
          "every layout identical to textarena 0.7.4")


def test_sokoban_boards_identical():
    env, ours = _ta_sokoban(), Sokoban6x6Env(generator="textarena")
    distinct = set()
    for seed in SEEDS:
        env.reset(num_players=1, seed=seed)
        _, info = ours.reset(seed=seed)
        assert _our_sokoban_layout(info["state"]) == _ta_sokoban_layout(env), seed
        distinct.add(info["state"])
    assert len(distinct) >= 1000  # not a degenerate set (textarena's small rooms repeat: ~1400 of ~2200 differ)
    print(f"\nSokoban: {len(SEEDS)} seeds ({N_SEEDS} consecutive + {len(SEEDS) - N_SEEDS} of the paper's, "
          f"{len(distinct)} distinct rooms), every layout identical to textarena 0.7.4")


def test_the_board_functions_alone_match_the_env():
    # what the parity tests above drive through the env is exactly the module's functions
    for seed in (0, 5, 468460046):
        assert FrozenLake3x3Env(generator="textarena").reset(seed=seed)[1]["state"] == textarena_boards.frozen_lake(seed)
        assert Sokoban6x6Env(generator="textarena").reset(seed=seed)[1]["state"] == textarena_boards.sokoban(seed)


def _ta_position(env, game: str):
    if game == "frozenlake":
        return tuple(env.state.game_state["player_pos"])
    return _cells(env.room_state, 5)[0], _cells(env.room_state, 3, 4)[0]


def _our_position(state, game: str):
    return state.player if game == "frozenlake" else (state.player, state.box)


# textarena's wording of why a move was invalid or a game ended, per code our games report. Only for comparing:
# our games report codes, and what a model reads is our own wording (prompts.game_text, prompts.end_reasons).
TA_INVALID = {
    "frozenlake": {"no_action": "Invalid action format.", "refused": "You tried to move {word} but hit a wall!"},
    "sokoban": {"no_action": "The submitted move does not follow the correct format.",
                "refused": "You cannot move into a wall!"},
}
TA_END = {"goal": "Congratulations!", "hole": "You fell into a hole!", "invalid_moves": "Invalid Move: "}
TA_INVALID_NOTE = "You attempted an invalid move. Reason: "


def _invalid_notes(env) -> list[str]:
    return [m for _, m, kind in env.state.observations[0]
            if kind == ta.ObservationType.GAME_ADMIN and m.startswith(TA_INVALID_NOTE)]


@pytest.mark.parametrize("game", ["frozenlake", "sokoban"])
def test_rules_match_textarena(game):
    """Random 5-call games (a fifth of the calls without an action), played in both: the same positions after
    every call, the same invalid moves for the same reasons, the same ends (goal, hole, two invalid moves in a
    row); textarena keeps going where our call budget ends the game (the authors' rollout stops calling it
    there)."""
    make_ta = _ta_frozen_lake if game == "frozenlake" else _ta_sokoban
    env_cls = FrozenLake3x3Env if game == "frozenlake" else Sokoban6x6Env
    rng = random.Random(0)
    ends = collections.Counter()
    for seed in range(400):
        env = make_ta()
        env.reset(num_players=1, seed=seed)
        ours = TextGame(env_cls(generator="textarena"), max_calls=5, invalid_move_limit=2)
        ours.reset(seed=seed)
        for call in range(5):
            word = rng.choice(["up", "down", "left", "right", None]) if rng.random() < 0.8 else None
            # the authors' rollout sends "[word]" or "[no valid action]" (their _format_action)
            notes = len(_invalid_notes(env))
            done, _ = env.step(action=f"[{word}]" if word else "[no valid action]")
            _, reward, terminated, truncated, info = ours.step(f"[{word}]" if word else "no action here")
            assert _our_position(ours.state, game) == _ta_position(env, game), (seed, call)
            assert terminated == done, (seed, call)
            why = TA_INVALID[game][info["invalid_reason"]].format(word=word) if info["invalid_move"] else None
            if not done:  # textarena notes each invalid move that does not end the game, with its reason
                new_notes = _invalid_notes(env)[notes:]
                assert len(new_notes) == (why is not None), (seed, call)
                assert why is None or new_notes[0].startswith(TA_INVALID_NOTE + why), (seed, call, new_notes)
            if done:
                reason = env.state.game_info[0]["reason"]
                expected = TA_END[info["end_reason"]] + (why if info["end_reason"] == "invalid_moves" else "")
                assert reason.startswith(expected), (seed, call, reason)
                assert (reward == 1.0) == (env.state.rewards[0] == 1.0) == ours.success
                ends[info["end_reason"]] += 1
                break
        else:
            assert truncated and info["end_reason"] == "turn_limit"
            ends["turn_limit"] += 1
    expected = {"goal", "invalid_moves", "turn_limit"} | ({"hole"} if game == "frozenlake" else set())
    assert set(ends) == expected, ends  # every way a game can end was compared
    print(f"\n{game}: 400 random games, ends {dict(ends)}, identical to textarena 0.7.4")
