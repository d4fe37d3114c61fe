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


# -- textarena's invalid-move rule (invalid_move_limit) and the end reasons ------------------------------------------


def test_two_invalid_moves_in_a_row_end_the_game():
    game = make_game("frozenlake", seed=0, invalid_move_limit=2)
    board0 = game.board
    _, _, terminated, truncated, info = game.step("no idea")
    assert not terminated and not truncated and info["invalid_move"] and info["end_reason"] is None
    assert info["invalid_reason"] == "no_action"
    _, reward, terminated, truncated, info = game.step("still no idea")
    assert terminated and not truncated and reward == 0.0 and not game.success and game.calls == 2
    assert info["end_reason"] == game.end_reason == "invalid_moves"
    assert game.log_blocks[-1] == f"Invalid action.\nToo many invalid moves in a row. Game over.\nFinal board:\n{board0}"
    with pytest.raises(RuntimeError):
        game.step("[down]")


def test_a_refused_move_is_invalid_and_a_valid_one_resets_the_count():
    game = make_game("frozenlake", seed=0, invalid_move_limit=2)
    _, _, _, _, info = game.step("[up]")  # off the grid from the top-left start
    assert info["valid"] and info["invalid_move"] and info["invalid_reason"] == "refused"
    path = shortest_solution("frozenlake", game.state)
    _, _, terminated, _, info = game.step(f"[{path[0]}]")
    assert not terminated and not info["invalid_move"] and info["invalid_reason"] is None
    _, _, terminated, _, _ = game.step("nothing")
    assert not terminated  # one invalid move after a valid one
    _, _, terminated, _, info = game.step("[left]" if path[0] == "down" else "[up]")  # the edge again
    assert terminated and info["end_reason"] == "invalid_moves" and info["invalid_reason"] == "refused"


def test_sokoban_push_into_a_wall_counts_as_invalid():
    from oel_hpc.games import Sokoban6x6Env, SokobanState

    grid = ("######", "#____#", "#____#", "#____#", "#____#", "######")
    env = Sokoban6x6Env()
    game = TextGame(env, max_calls=5, invalid_move_limit=2)
    game.reset(seed=0)
    env._state = game._state = SokobanState(grid=grid, target=(4, 4), box=(1, 2), player=(2, 2))
    _, _, terminated, _, info = game.step("[up]")  # the box is against the top wall
    assert not terminated and info["invalid_reason"] == "refused"
    assert info["message"] == "The box cannot move that way."
    _, _, terminated, _, info = game.step("[w]")
    assert terminated and info["end_reason"] == "invalid_moves" and info["invalid_reason"] == "refused"


def test_the_second_invalid_move_on_the_last_call_ends_by_the_rule():
    game = make_game("sokoban", seed=1, max_calls=2, invalid_move_limit=2)
    game.step("?")
    _, _, terminated, truncated, info = game.step("?")
    assert terminated and not truncated and info["end_reason"] == "invalid_moves"


def test_without_the_rule_invalid_moves_run_out_the_budget():
    game = make_game("frozenlake", seed=0, max_calls=3)
    for _ in range(3):
        _, _, terminated, truncated, info = game.step("?")
    assert truncated and not terminated
    assert info["end_reason"] == game.end_reason == "turn_limit"
    assert game.log_blocks[-1] == f"Invalid action.\nOut of moves. Game over.\nFinal board:\n{game.board}"


def test_end_reasons_for_goal_and_hole():
    seed, move = _hole_seed_and_move()
    game = make_game("frozenlake", seed=seed)
    _, _, _, _, info = game.step(f"[{move}]")
    assert info["end_reason"] == game.end_reason == "hole" and not game.success
    game.reset(seed=2)
    assert game.end_reason is None
    for word in shortest_solution("frozenlake", game.state):
        _, _, _, _, info = game.step(f"[{word}]")
    assert info["end_reason"] == game.end_reason == "goal" and game.success
    game = make_game("sokoban", seed=0, max_calls=50)
    for word in shortest_solution("sokoban", game.state):
        _, _, _, _, info = game.step(f"[{word}]")
    assert info["end_reason"] == game.end_reason == "goal" and game.success


def test_a_game_that_ends_without_a_reason_is_an_error():
    """An env ending a game must say why (goal or hole): the extractor is told, so no reason is guessed."""

    class Silent(FrozenLake3x3Env):
        def step(self, action):
            board, reward, terminated, truncated, info = super().step(action)
            return board, reward, terminated, truncated, dict(info, end_reason=None)

    seed, move = _hole_seed_and_move()
    game = TextGame(Silent(), max_calls=5)
    game.reset(seed=seed)
    with pytest.raises(RuntimeError, match="end_reason"):
        game.step(f"[{move}]")


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_invalid_move_limit_must_be_positive(bad):
    with pytest.raises(ValueError, match="invalid_move_limit"):
        TextGame(FrozenLake3x3Env(), invalid_move_limit=bad)


def test_textarena_generator_through_make_game():
    from oel_hpc.games import textarena_boards

    game = make_game("sokoban", seed=11, generator="textarena")
    assert game.state == textarena_boards.sokoban(11)
    assert make_game("sokoban", seed=11).state != game.state  # the other generator: another room


# -- the protocol keys in the config ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides,key", [
    (["env.generator=gym"], "env.generator"),
    (["env.seeds=authors"], "env.seeds"),
    (["env.invalid_move_limit=0"], "env.invalid_move_limit"),
    (["env.seeds=paper"], "extract.shared_games"),
    (["env.seeds=paper", "extract.shared_games=true", "evaluate.games=629"], "env.seeds"),
])
def test_protocol_keys_are_validated(overrides, key):
    from oel_hpc.config import ConfigError, validate
    from tests.conftest import compose

    with pytest.raises(ConfigError) as e:
        validate(compose(overrides), check_files=False)
    assert e.value.key == key


def test_paper_recipes_play_the_authors_games_and_tiny_keeps_its_own():
    from oel_hpc.config import CONF_DIR
    from tests.conftest import compose

    recipes = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml") if p.stem != "tiny")
    assert {"frozenlake_qwen3_1_7b", "frozenlake_qwen3_4b", "frozenlake_qwen3_8b",
            "sokoban_qwen3_4b_instruct"} <= set(recipes)  # and smollm2_frozenlake, on the authors' games too
    for recipe in recipes:
        cfg = compose([f"experiment={recipe}"])
        assert (cfg.env.generator, cfg.env.seeds, cfg.env.invalid_move_limit, cfg.extract.shared_games) == \
            ("textarena", "paper", 2, True), recipe
    tiny = compose()
    assert (tiny.env.generator, tiny.env.seeds, tiny.env.invalid_move_limit, tiny.extract.shared_games) == \
        ("oel", "oel", None, False)


def test_a_run_with_the_authors_games(tmp_path):
    """The tiny pipeline with every paper option on: the stages deal the authors' seeds and textarena's boards."""
    import json
    import subprocess
    import sys

    from oel_hpc.games import textarena_boards
    from oel_hpc.games.frozen_lake import render
    from oel_hpc.rundir import read_jsonl
    from tests.conftest import ROOT

    out = subprocess.run(
        [sys.executable, "-m", "oel_hpc", f"run.root={tmp_path}", "run.name=paper-games", "wandb.mode=disabled",
         "env.generator=textarena", "env.seeds=paper", "env.invalid_move_limit=2", "extract.shared_games=true",
         "extract.steps=2", "extract.use_step=2", "extract.eval_games=2", "deploy.games_per_step=2",
         "consolidate.steps=1", "evaluate.games=2"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = tmp_path / "paper-games" / "round_1"
    authors_extraction = [468382021 + 78025 + 1 * 500000 + i * 1000 for i in range(128, 130)]
    for seed in (0, 1):
        games = read_jsonl(run / f"extract/seed_{seed}/games.jsonl")
        assert [g["game_seed"] for g in games] == authors_extraction
    rows = read_jsonl(run / "deploy/step_1.jsonl")
    authors_deploy = [505019424 + 90039 + 100000 + tmp_num * 1000 for tmp_num in range(1 * 2, 2 * 2)]
    assert sorted({r["game_seed"] for r in rows}) == authors_deploy
    for row in rows:
        if row["turn"] == 1:
            assert render(textarena_boards.frozen_lake(row["game_seed"])) in row["log_blocks"][0]
    assert json.loads((run / "eval/step_1.json").read_text())["games"] == 2


# -- the wording table (prompts.game_text) ------------------------------------------------------------------------


def test_log_wording_comes_from_the_text_table():
    text = {"turn_heading": "[{turn}]", "final_heading": "[end]", "action": "> {action}",
            "invalid": "??", "out_of_moves": "(no calls left)", "invalid_limit": "(too many misses)"}
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
    # the invalid-move rule's line is the table's too
    game = TextGame(FrozenLake3x3Env(), max_calls=5, invalid_move_limit=2, text=text)
    game.reset(seed=0)
    game.step("[a]")
    _, _, terminated, _, info = game.step("nothing")
    assert terminated and info["end_reason"] == "invalid_moves"
    assert game.log_blocks[-1] == f"??\n(too many misses)\n[end]\n{board0}"


@pytest.mark.parametrize("change,key", [
    ({"turn_heading": "Turn {n}:"}, "log.turn_heading"),
    ({"action": 3}, "log.action"),
    ({"extra": "x"}, "log.extra"),
    ({"invalid_limit": "{reason}"}, "log.invalid_limit"),
])
def test_bad_log_table_is_refused_naming_the_key(change, key):
    from oel_hpc.games.protocol import LOG_TEXT
    from oel_hpc.games.text import TextTableError

    with pytest.raises(TextTableError) as e:
        TextGame(FrozenLake3x3Env(), text={**LOG_TEXT, **change})
    assert e.value.key == key


def test_a_log_table_without_the_invalid_limit_line_is_refused():
    """A prompt set written before the invalid-move rule existed must add its line, not fall back silently."""
    from oel_hpc.games.protocol import LOG_TEXT
    from oel_hpc.games.text import TextTableError

    table = {k: v for k, v in LOG_TEXT.items() if k != "invalid_limit"}
    with pytest.raises(TextTableError, match="missing") as e:
        TextGame(FrozenLake3x3Env(), text=table)
    assert e.value.key == "log.invalid_limit"


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

