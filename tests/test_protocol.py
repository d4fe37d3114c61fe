"""The text protocol (TextGame): call budget, invalid moves, game log, success."""

from __future__ import annotations

import pytest

from oel_hpc.games import (
    FrozenLake3x3Env,
    LOG_SEPARATOR,
    TextGame,
    join_blocks,
    make_game,
    shortest_solution,
)
from oel_hpc.games.frozen_lake import render as fl_render


def _hole_seed_and_move():
    """A Frozen Lake seed where some first move falls into a hole."""
    env = FrozenLake3x3Env()
    for seed in range(100):
        _, info = env.reset(seed=seed)
        holes = info["state"].holes
        if (0, 1) in holes:
            return seed, "right"
        if (1, 0) in holes:
            return seed, "down"
    raise AssertionError("no seed with a hole next to the start")


def test_make_game_and_initial_log():
    game = make_game("frozenlake", seed=7)
    assert game.calls == 0 and not game.done and not game.success
    assert game.log_blocks == [f"Turn 1:\n{game.board}"]
    assert game.game_log == game.log_blocks[0]
    assert game.board == fl_render(game.state)
    assert game.action_words == ("[up]", "[down]", "[left]", "[right]")
    log, info = game.reset(seed=7)
    assert log == game.game_log and info["calls"] == 0 and info["state"] == game.state
    assert make_game("Sokoban", seed=7).game_log == make_game("sokoban", seed=7).game_log


def test_make_game_unknown_name():
    with pytest.raises(ValueError, match="frozenlake.*sokoban"):
        make_game("chess", seed=0)


@pytest.mark.parametrize("name", ["frozenlake", "sokoban"])
def test_invalid_responses_use_up_calls_then_truncated(name):
    game = make_game(name, seed=3)
    first_board = game.board
    for call in range(1, 6):
        log, reward, terminated, truncated, info = game.step("I have no idea. [upward] [jump]")
        assert info["valid"] is False and info["action"] is None
        assert info["message"] == "Invalid action."
        assert reward == 0.0 and not terminated
        assert truncated == (call == 5)
        assert game.calls == call and len(game.log_blocks) == call + 1
        assert game.board == first_board
    assert game.done and not game.success
    assert "Out of moves" in game.log_blocks[-1] and "Final board:" in game.log_blocks[-1]
    with pytest.raises(RuntimeError):
        game.step("[up]")


def test_hole_ends_game_with_zero_reward():
    seed, move = _hole_seed_and_move()
    game = make_game("frozenlake", seed=seed)
    log, reward, terminated, truncated, info = game.step(f"Let me go [{move}]")
    assert terminated and not truncated and reward == 0.0
    assert info["valid"] and info["action"] == move and "hole" in info["message"]
    assert game.done and not game.success and game.calls == 1
    assert game.log_blocks[1].startswith(f"Action: [{move}]\n")
    assert "Final board:" in game.log_blocks[1]


@pytest.mark.parametrize("name", ["frozenlake", "sokoban"])
@pytest.mark.parametrize("seed", [0, 1, 2, 11, 42])
def test_following_solver_wins_and_log_hides_responses(name, seed):
    game = make_game(name, seed=seed)
    path = shortest_solution(name, game.state)
    if len(path) > 5:
        pytest.skip("room needs more than 5 moves")
    responses = []
    for i, word in enumerate(path):
        wrong = {"up": "down", "down": "up", "left": "right", "right": "left"}[word]
        response = f"SECRET-REASONING-{i} I think... [{wrong}] no wait [{word}] done."
        responses.append(response)
        n_blocks = len(game.log_blocks)
        log, reward, terminated, truncated, info = game.step(response)
        assert len(game.log_blocks) == n_blocks + 1
        assert info["action"] == word and info["valid"]
        assert game.log_blocks[-1].startswith(f"Action: [{word}]\n{info['message']}\n")
    assert terminated and not truncated and reward == 1.0 and game.success and game.done
    assert game.actions == path
    log = game.game_log
    assert log == LOG_SEPARATOR.join(game.log_blocks) == join_blocks(game.log_blocks)
    assert "SECRET" not in log and "wait" not in log and "think" not in log
    assert game.observation_space.contains(log)
    # determinism: replaying the same responses gives the same log
    replay = make_game(name, seed=seed)
    for response in responses:
        replay.step(response)
    assert replay.game_log == log


def test_two_call_log_format():
    game = TextGame(FrozenLake3x3Env(), max_calls=2)
    game.reset(seed=0)
    board0 = game.board
    game.step("[a]")  # left from the top-left corner: bump the edge
    game.step("nothing")
    assert game.log_blocks == [
        f"Turn 1:\n{board0}",
        f"Action: [left]\nYou hit the edge and stayed in place.\nTurn 2:\n{board0}",
        f"Invalid action.\nOut of moves. Game over.\nFinal board:\n{board0}",
    ]
    assert game.truncated and not game.terminated


def test_step_before_reset_and_bad_types():
    game = TextGame(FrozenLake3x3Env())
    with pytest.raises(RuntimeError):
        game.step("[up]")
    game.reset(seed=0)
    with pytest.raises(TypeError):
        game.step(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        TextGame(FrozenLake3x3Env(), max_calls=0)


# -- the wording table (prompts.game_text) ------------------------------------------------------------------------


def test_log_wording_comes_from_the_text_table():
    text = {"turn_heading": "[{turn}]", "final_heading": "[end]", "action": "> {action}",
            "invalid": "??", "out_of_moves": "(no calls left)"}
    game = TextGame(FrozenLake3x3Env(), max_calls=2, text=text)
    game.reset(seed=0)
    board0 = game.board
    game.step("[a]")
    game.step("nothing")
    assert game.log_blocks == [
        f"[1]\n{board0}",
        f"> left\nYou hit the edge and stayed in place.\n[2]\n{board0}",
        f"??\n(no calls left)\n[end]\n{board0}",
    ]


@pytest.mark.parametrize("change,key", [
    ({"turn_heading": "Turn {n}:"}, "log.turn_heading"),
    ({"action": 3}, "log.action"),
    ({"extra": "x"}, "log.extra"),
])
def test_bad_log_table_is_refused_naming_the_key(change, key):
    from oel_hpc.games.protocol import LOG_TEXT
    from oel_hpc.games.text import TextTableError

    with pytest.raises(TextTableError) as e:
        TextGame(FrozenLake3x3Env(), text={**LOG_TEXT, **change})
    assert e.value.key == key


def test_bad_game_table_is_refused_naming_the_key():
    from oel_hpc.games import frozen_lake
    from oel_hpc.games.text import TextTableError

    table = {"symbols": {**frozen_lake.SYMBOLS, "goal": "P"}, **frozen_lake.TEXT}
    with pytest.raises(TextTableError, match="'P' is also the symbol of player") as e:
        FrozenLake3x3Env(text=table)
    assert e.value.key == "frozenlake.symbols.goal"


def test_default_yaml_holds_the_code_defaults():
    """conf/prompts/default.yaml's game_text is the wording the games use without one (no drift between them)."""
    from omegaconf import OmegaConf

    from oel_hpc.config import CONF_DIR
    from oel_hpc.games.text import default_game_text

    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "prompts" / "default.yaml").game_text)
    assert yaml == default_game_text()


def test_end_reason_of_a_finished_game():
    from oel_hpc.games.text import end_reason

    seed, move = _hole_seed_and_move()
    game = make_game("frozenlake", seed=seed)
    *_, info = game.step(f"[{move}]")
    assert end_reason(game, info) == "hole"

    game = make_game("frozenlake", seed=0, max_calls=1)
    *_, info = game.step("no move")
    assert end_reason(game, info) == "out_of_moves"

    game = make_game("sokoban", seed=0, max_calls=50)
    for word in shortest_solution("sokoban", game.state):
        *_, info = game.step(f"[{word}]")
    assert game.success and end_reason(game, info) == "success"
    assert end_reason(game, {"end_reason": "invalid_moves"}) == "invalid_moves"  # the env's own word wins

    with pytest.raises(ValueError, match="not over"):
        end_reason(make_game("sokoban", seed=0), {})
