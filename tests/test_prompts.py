"""Rendered prompts and game logs against hand-written expectations, budgets, prompt sets kept in files, and bad
prompt sets (each a ConfigError naming its key)."""
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from oel_hpc.config import CONF_DIR, ConfigError, validate
from oel_hpc.games import frozen_lake, make_game, sokoban
from oel_hpc.games.frozen_lake import FrozenLakeState
from oel_hpc.games.sokoban import SokobanState
from oel_hpc.prompts import Ending, PromptBuilder, PromptTooLong, check_template, prompt_budgets
from tests.conftest import ROOT, compose

TEMPLATES = OmegaConf.load(CONF_DIR / "prompts" / "default.yaml")
ACTIONS = ("[up]", "[down]", "[left]", "[right]")
BLOCKS = ["Turn 1:\nP _ _\n_ _ H\nH _ G", "Action: [right]\nYou moved right.\nTurn 2:\n_ P _\n_ _ H\nH _ G"]
HOLE_ENDING = Ending(False, "hole",
                     "Action: [down]\nYou fell into a hole. Game over.\nFinal board:\n_ _ _\nP _ H\nH _ G")


def words(messages):  # a stand-in tokenizer: one token per whitespace-separated word
    return sum(len(m["content"].split()) for m in messages)


def builder(turn_budget=10_000, extractor_budget=10_000, templates=TEMPLATES):
    return PromptBuilder(templates, words, turn_budget, extractor_budget)


@pytest.fixture
def fixed_boards(monkeypatch):
    """Every game starts from one known board, so the expected logs below can be written by hand."""
    lake = FrozenLakeState(player=(0, 0), holes=((0, 2), (2, 0)))  # P _ H / _ _ _ / H _ G
    room = SokobanState(grid=("######", "#__#_#", "#____#", "#____#", "#____#", "######"),
                        target=(3, 3), box=(3, 2), player=(3, 1))
    monkeypatch.setattr(frozen_lake, "generate", lambda *args, **kwargs: lake)
    monkeypatch.setattr(sokoban, "generate", lambda *args, **kwargs: room)


# -- game turns: the default prompt set renders today's text byte for byte ----------------------------------------


def test_game_turn_without_experience():
    [msg] = builder().game_turn(BLOCKS, ACTIONS)
    assert msg == {"role": "user", "content": (
        "You are P on a small grid. Reach the goal in as few moves as possible; each turn you move one cell.\n"
        "Give your move in square brackets, one of [up], [down], [left], [right].\n"
        "Game so far:\n"
        "Turn 1:\nP _ _\n_ _ H\nH _ G\n\n"
        "Action: [right]\nYou moved right.\nTurn 2:\n_ P _\n_ _ H\nH _ G")}


def test_game_turn_with_experience_puts_header_before_the_situation():
    [msg] = builder().game_turn(BLOCKS, ACTIONS, experience="- Holes end the game.\n- Go right.")
    assert msg["content"] == (
        "You are P on a small grid. Reach the goal in as few moves as possible; each turn you move one cell.\n"
        "Give your move in square brackets, one of [up], [down], [left], [right].\n"
        "Experience from earlier games:\n- Holes end the game.\n- Go right.\n"
        "Game so far:\n"
        "Turn 1:\nP _ _\n_ _ H\nH _ G\n\n"
        "Action: [right]\nYou moved right.\nTurn 2:\n_ P _\n_ _ H\nH _ G")


def test_default_text_table_renders_a_frozen_lake_game_as_before(fixed_boards):
    """A real game through the default prompt set's game_text: the log the committed tiny model was trained on."""
    game = make_game("frozenlake", seed=0, text=builder().game_text)
    for response in ("[left]", "no idea", "I go [s]"):
        game.step(response)
    [msg] = builder().game_turn(game.log_blocks, game.action_words)
    assert msg["content"] == (
        "You are P on a small grid. Reach the goal in as few moves as possible; each turn you move one cell.\n"
        "Give your move in square brackets, one of [up], [down], [left], [right].\n"
        "Game so far:\n"
        "Turn 1:\nP _ H\n_ _ _\nH _ G\n\n"
        "Action: [left]\nYou hit the edge and stayed in place.\nTurn 2:\nP _ H\n_ _ _\nH _ G\n\n"
        "Invalid action.\nTurn 3:\nP _ H\n_ _ _\nH _ G\n\n"
        "Action: [down]\nYou moved down.\nTurn 4:\n_ _ H\nP _ _\nH _ G")
    game.step("[down]")
    assert game.log_blocks[-1] == "Action: [down]\nYou fell into a hole. Game over.\nFinal board:\n_ _ H\n_ _ _\nP _ G"


def test_default_text_table_renders_a_sokoban_game_as_before(fixed_boards):
    game = make_game("sokoban", seed=0, text=builder().game_text)
    for response in ("[a]", "[w]", "[s]", "[d]"):
        game.step(response)
    assert game.success
    assert game.log_blocks == [
        "Turn 1:\n# # # # # #\n# _ _ # _ #\n# _ _ _ _ #\n# P X O _ #\n# _ _ _ _ #\n# # # # # #",
        "Action: [left]\nA wall blocks the way.\nTurn 2:\n"
        "# # # # # #\n# _ _ # _ #\n# _ _ _ _ #\n# P X O _ #\n# _ _ _ _ #\n# # # # # #",
        "Action: [up]\nYou moved up.\nTurn 3:\n"
        "# # # # # #\n# _ _ # _ #\n# P _ _ _ #\n# _ X O _ #\n# _ _ _ _ #\n# # # # # #",
        "Action: [down]\nYou moved down.\nTurn 4:\n"
        "# # # # # #\n# _ _ # _ #\n# _ _ _ _ #\n# P X O _ #\n# _ _ _ _ #\n# # # # # #",
        "Action: [right]\nYou pushed the box onto the target. Puzzle solved!\nFinal board:\n"
        "# # # # # #\n# _ _ # _ #\n# _ _ _ _ #\n# _ P √ _ #\n# _ _ _ _ #\n# # # # # #",
    ]


def test_no_rule_or_legend_is_told():
    text = builder().game_turn(BLOCKS, ACTIONS)[0]["content"].lower()
    for leak in ("hole", "h is", "g is", "goal is", "frozen", "ice"):
        assert leak not in text


# -- a text table of one's own -------------------------------------------------------------------------------------

CUSTOM_TEXT = {
    "log": {"turn_heading": "== Step {turn} ==", "final_heading": "== End ==", "action": "You chose {action}.",
            "invalid": "No move found.", "out_of_moves": "No moves left.", "invalid_limit": "Too many misses."},
    "frozenlake": {"symbols": {"player": "@", "hole": "O", "goal": "*", "frozen": "."},
                   "moved": "Moved {direction}.", "edge": "Bumped the {direction} edge.", "hole": "Splash.",
                   "goal": "Home!"},
    "sokoban": dict(TEMPLATES.game_text.sokoban),
}


def test_custom_text_table_words_the_log_and_draws_the_board(fixed_boards):
    game = make_game("frozenlake", seed=0, max_calls=4, text=CUSTOM_TEXT)
    for response in ("[up]", "[right]", "hmm", "[s]"):
        game.step(response)
    assert game.log_blocks == [
        "== Step 1 ==\n@ . O\n. . .\nO . *",
        "You chose up.\nBumped the up edge.\n== Step 2 ==\n@ . O\n. . .\nO . *",
        "You chose right.\nMoved right.\n== Step 3 ==\n. @ O\n. . .\nO . *",
        "No move found.\n== Step 4 ==\n. @ O\n. . .\nO . *",
        "You chose down.\nMoved down.\nNo moves left.\n== End ==\n. . O\n. @ .\nO . *",
    ]
    assert game.observation_space.contains(game.game_log)


def test_custom_text_table_through_the_config(fixed_boards):
    cfg = compose(["prompts.game_text.frozenlake.symbols.frozen=.", "prompts.game_text.log.final_heading=Over:"])
    validate(cfg, check_files=False)
    game = make_game("frozenlake", seed=0, text=builder(templates=cfg.prompts).game_text)
    game.step("[right]")
    game.step("[right]")
    assert game.log_blocks[-1] == "Action: [right]\nYou fell into a hole. Game over.\nOver:\n. . P\n. . .\nH . G"


# -- the extractor ------------------------------------------------------------------------------------------------


def test_extractor_prompt_shows_how_the_game_ended():
    [msg] = builder().extractor([("Turn 1:\nP _ H\n_ _ _\nH _ G", "I go [down]")], HOLE_ENDING, "- Old lesson.")
    assert msg["content"] == (
        "You played a grid game as P. This is what you saw and answered, turn by turn:\n"
        "Turn 1:\nP _ H\n_ _ _\nH _ G\nYou answered: I go [down]\n\n"
        "Then the game ended:\n"
        "Action: [down]\nYou fell into a hole. Game over.\nFinal board:\n_ _ _\nP _ H\nH _ G\n"
        "Why it ended: you stepped into a hole.\n"
        "Outcome: Failure\n"
        "Lessons you already wrote:\n- Old lesson.\n"
        'Write one or two short, general lessons that would help you win next time. Put each lesson on its own '
        'line, starting with "- ".')


def test_extractor_free_text_prompt_has_no_marker_and_its_own_request():
    ending = Ending(True, "goal", "Action: [right]\nYou reached the goal!\nFinal board:\n_ _ _\n_ _ _\nH _ P")
    [msg] = builder().extractor([("Turn 1:\nboard", "[right]")], ending, mode="free_text")
    assert msg["content"] == (
        "You played a grid game as P. This is what you saw and answered, turn by turn:\n"
        "Turn 1:\nboard\nYou answered: [right]\n\n"
        "Then the game ended:\n"
        "Action: [right]\nYou reached the goal!\nFinal board:\n_ _ _\n_ _ _\nH _ P\n"
        "Why it ended: you won.\n"
        "Outcome: Success\n"
        "Work out what the symbols and rules of this game are and what wins or loses it. Then write what you "
        "learned as advice for your next game: general rules and strategies, not moves for this one board. Your "
        "answer will be added to your notes as it is.")


def test_extractor_end_reasons_and_outcomes_come_from_the_prompt_set():
    templates = OmegaConf.merge(TEMPLATES, {"end_reasons": {"turn_limit": "time ran out"},
                                            "outcomes": {"failure": "LOST"},
                                            "extractor_ending": "[{reason}]\n{final_block}\n"})
    ending = Ending(False, "turn_limit", "Invalid action.\nOut of moves. Game over.\nFinal board:\nB")
    content = builder(templates=templates).extractor([("Turn 5:\nB", "?")], ending)[0]["content"]
    assert "You answered: ?\n\n[time ran out]\nInvalid action.\nOut of moves. Game over.\nFinal board:\nB\n" \
           "Outcome: LOST\n" in content


def test_extractor_sees_a_game_lost_to_the_invalid_move_rule(fixed_boards):
    """A played game, not a hand-made ending: the rule's log line and its reason reach the extractor in the prompt
    set's words."""
    game = make_game("frozenlake", seed=0, invalid_move_limit=2, text=builder().game_text)
    turns = []
    for response in ("[up]", "no idea"):  # a move into the edge, then no move: two invalid moves in a row
        turns.append((game.log_blocks[-1], response))
        game.step(response)
    assert game.end_reason == "invalid_moves" and not game.success
    ending = Ending(game.success, game.end_reason, game.log_blocks[-1])
    content = builder().extractor(turns, ending)[0]["content"]
    assert "You answered: no idea\n\nThen the game ended:\nInvalid action.\n" \
           "Too many invalid moves in a row. Game over.\nFinal board:\nP _ H\n_ _ _\nH _ G\n" \
           "Why it ended: you made too many invalid moves in a row.\nOutcome: Failure\n" in content


def test_every_end_reason_the_games_report_is_worded():
    from oel_hpc.games.protocol import END_REASONS

    assert sorted(TEMPLATES.end_reasons) == sorted(END_REASONS) == ["goal", "hole", "invalid_moves", "turn_limit"]


def test_extractor_with_an_end_reason_the_prompt_set_does_not_word_is_an_error():
    with pytest.raises(ConfigError, match="prompts.end_reasons: has no wording for the end reason 'lava'"):
        builder().extractor([("Turn 1:\nB", "[up]")], Ending(False, "lava", "B"))


# -- budgets ------------------------------------------------------------------------------------------------------


def test_system_prompt_is_a_separate_message():
    templates = OmegaConf.merge(TEMPLATES, {"system": "Be brief."})
    msgs = PromptBuilder(templates, words, 10_000, 10_000).game_turn(BLOCKS, ACTIONS)
    assert [m["role"] for m in msgs] == ["system", "user"]


def test_over_budget_drops_oldest_blocks_and_keeps_the_current_board():
    full = words(builder().game_turn(BLOCKS, ACTIONS))
    [msg] = builder(turn_budget=full - 1).game_turn(BLOCKS, ACTIONS)
    assert "(earlier turns omitted)" in msg["content"]
    assert "Turn 1:" not in msg["content"]
    assert msg["content"].endswith(BLOCKS[-1])  # the end of the prompt (current board) is never cut


def test_over_budget_even_with_newest_block_fails_clearly():
    with pytest.raises(PromptTooLong, match="budget of 5: raise experience.max_tokens or prompts.tokens_per_turn"):
        builder(turn_budget=5).game_turn(BLOCKS, ACTIONS)


def test_extractor_over_budget_drops_oldest_turns_but_keeps_the_ending():
    turns = [(f"Turn {i}:\nboard", "answer " * 20) for i in range(1, 6)]
    full = words(builder().extractor(turns, HOLE_ENDING))
    [msg] = builder(extractor_budget=full - 10).extractor(turns, HOLE_ENDING)
    assert "(earlier turns omitted)" in msg["content"] and "Turn 1:" not in msg["content"]
    assert "Why it ended: you stepped into a hole.\nOutcome: Failure" in msg["content"]


def test_prompt_budgets_of_the_tiny_default():
    # experience cap 256, 96 tokens per turn, 5 turns, 48 new tokens per extraction game turn (conf/experiment/tiny)
    assert prompt_budgets(compose()) == (256 + 96 * 5, 256 + 96 * 5 + 96 + 48 * 5)


def test_extractor_budget_must_fit_the_model_context():
    # the tiny model's context is 2048 tokens; its extractor prompt may take 1072 of them
    validate(compose(["extract.extractor_sampling.max_new_tokens=976"]))
    with pytest.raises(ConfigError, match="1072 prompt \\+ 977 new tokens, more than the model's context of 2048") as e:
        validate(compose(["extract.extractor_sampling.max_new_tokens=977"]))
    assert e.value.key == "extract.extractor_sampling.max_new_tokens"


# -- bad prompt sets ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,text,match", [
    ("game_turn", "{actions} {game_log}", "missing placeholder"),
    ("game_turn", "{actions} {experience_block} {game_log} {gamelog}", "unknown placeholder"),
    ("experience_block", "{experience", "not a valid template"),
    ("extractor", "{history} {outcome} {previous_block} {marker}", r"missing placeholder\(s\) \['ending'\]"),
    ("extractor_free_text", "{history} {ending} {outcome} {previous_block} {marker}", "unknown placeholder"),
    ("extractor_ending", "{final_block}", r"missing placeholder\(s\) \['reason'\]"),
])
def test_bad_templates_are_config_errors(name, text, match):
    with pytest.raises(ConfigError, match=match) as e:
        check_template(name, text)
    assert e.value.key == f"prompts.{name}"


@pytest.mark.parametrize("override,key,match", [
    ("prompts.game_text.log.turn_heading='Turn {turns}:'", "prompts.game_text.log.turn_heading",
     r"unknown placeholder\(s\) \['turns'\]; allowed \['turn'\]"),
    ("prompts.game_text.log.invalid='Invalid {direction}.'", "prompts.game_text.log.invalid", "unknown placeholder"),
    ("prompts.game_text.frozenlake.edge='Edge {where}.'", "prompts.game_text.frozenlake.edge",
     r"allowed \['direction'\]"),
    ("prompts.game_text.sokoban.wall='{'", "prompts.game_text.sokoban.wall", "not a valid template"),
    ("~prompts.game_text.frozenlake.hole", "prompts.game_text.frozenlake.hole", "missing"),
    ("+prompts.game_text.frozenlake.lava=Hot.", "prompts.game_text.frozenlake.lava", "unknown key"),
    ("~prompts.game_text.sokoban", "prompts.game_text.sokoban", "missing"),
    ("prompts.game_text.frozenlake.goal=''", "prompts.game_text.frozenlake.goal", "non-empty string"),
    ("prompts.game_text.frozenlake.symbols.hole=HH", "prompts.game_text.frozenlake.symbols.hole", "one character"),
    ("prompts.game_text.sokoban.symbols.box=O", "prompts.game_text.sokoban.symbols.target",
     "'O' is also the symbol of box"),
    ("~prompts.game_text.sokoban.symbols.wall", "prompts.game_text.sokoban.symbols.wall", "missing"),
    ("~prompts.end_reasons.hole", "prompts.end_reasons.hole", "non-empty string"),
    ("+prompts.end_reasons.success=you won", "prompts.end_reasons.success", "unknown key"),
    ("~prompts.end_reasons.turn_limit", "prompts.end_reasons.turn_limit", "non-empty string"),
    ("~prompts.game_text.log.invalid_limit", "prompts.game_text.log.invalid_limit", "missing"),
    ("+prompts.outcomes.draw=Draw", "prompts.outcomes.draw", "unknown key"),
    ("prompts.extractor_ending='{reason}'", "prompts.extractor_ending", "missing placeholder"),
    (["experience.mode=free_text", "prompts.extractor_free_text=null"], "prompts.extractor_free_text",
     "needed by experience.mode=free_text"),
    ("experience.mode=lines", "experience.mode", "must be items or free_text"),
])
def test_bad_prompt_sets_are_config_errors_naming_the_key(override, key, match):
    with pytest.raises(ConfigError, match=match) as e:
        validate(compose(override if isinstance(override, list) else [override]), check_files=False)
    assert e.value.key == key


# -- prompt sets kept in files ------------------------------------------------------------------------------------

MINE = """\
# a prompt set of one's own: the default's keys, a few reworded
defaults:
  - default
  - _self_
name: mine
extractor_ending: |
  It ended ({reason}):
  {final_block}
game_text:
  log:
    turn_heading: "Round {turn}:"
"""


@pytest.fixture
def my_conf(tmp_path):
    (tmp_path / "prompts").mkdir()
    (tmp_path / "prompts" / "mine.yaml").write_text(MINE)
    bad = MINE.replace("name: mine", "name: bad").replace('"Round {turn}:"', '"Round {round}:"')
    (tmp_path / "prompts" / "bad.yaml").write_text(bad)
    return tmp_path


def test_prompt_set_from_a_folder_outside_the_repository(my_conf, fixed_boards):
    cfg = compose([f"hydra.searchpath=[file://{my_conf}]", "prompts=mine"])
    validate(cfg, check_files=False)
    b = builder(templates=cfg.prompts)
    game = make_game("frozenlake", seed=0, text=b.game_text)
    game.step("[down]")
    assert game.log_blocks == ["Round 1:\nP _ H\n_ _ _\nH _ G", "Action: [down]\nYou moved down.\nRound 2:\n"
                               "_ _ H\nP _ _\nH _ G"]
    ending = Ending(False, "hole", "the last block")
    assert "You answered: [down]\n\nIt ended (you stepped into a hole):\nthe last block\nOutcome: Failure\n" in \
        b.extractor([("Round 1:\nP _ H", "[down]")], ending)[0]["content"]


def oel(*args, cwd):
    return subprocess.run([sys.executable, "-m", "oel_hpc", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})


def test_cli_takes_a_prompt_set_from_searchpath_or_config_dir(my_conf, tmp_path):
    for how in ([f"hydra.searchpath=[file://{my_conf}]"], ["--config-dir", str(my_conf)]):
        out = oel(*how, "prompts=mine", "--cfg", "job", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        assert "turn_heading: 'Round {turn}:'" in out.stdout and "name: mine" in out.stdout


def test_cli_bad_prompt_set_one_line_exit_2(my_conf, tmp_path):
    out = oel(f"hydra.searchpath=[file://{my_conf}]", "prompts=bad", f"run.root={tmp_path / 'runs'}", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip() == ("oel_hpc: error: prompts.game_text.log.turn_heading: unknown placeholder(s) "
                                  "['round']; allowed ['turn']")
    assert not (tmp_path / "runs").exists()
    out = oel("prompts=mine", "--cfg", "job", cwd=tmp_path)  # not on the search path: unknown
    assert out.returncode == 2 and "unknown prompts 'mine' (available: chat, default)" in out.stderr


# -- the recipes --------------------------------------------------------------------------------------------------


def test_recipes_give_the_extractor_the_authors_budget_and_experience_mode():
    """The authors' extraction scripts: 2048 new tokens and free-text experience ("v3") for Qwen3-1.7B, 8192 and
    marker items ("v4") for the others; the extractor samples at T 0.7, top-p 0.8, top-k 20. Game turns keep 1024."""
    expected = {"frozenlake_qwen3_1_7b": (2048, "free_text"), "frozenlake_qwen3_4b": (8192, "items"),
                "frozenlake_qwen3_8b": (8192, "items"), "sokoban_qwen3_4b_instruct": (8192, "items"),
                "tiny": (48, "items")}
    for recipe, (tokens, mode) in expected.items():
        cfg = compose([f"experiment={recipe}"])
        s = cfg.extract.extractor_sampling
        assert (s.max_new_tokens, s.temperature, s.top_p, s.top_k, cfg.experience.mode) == (tokens, 0.7, 0.8, 20, mode)
        assert cfg.extract.sampling.max_new_tokens == (48 if recipe == "tiny" else 1024)


@pytest.mark.parametrize("override", ["extract.extractor_sampling.max_new_tokens=40", "experience.mode=free_text",
                                      "prompts.end_reasons.hole=you sank", "prompts.game_text.log.invalid=Huh?",
                                      "prompts.game_text.sokoban.symbols.box=B", "model.thinking=true"])
def test_every_new_key_is_in_the_extract_hash(override):
    from oel_hpc.pipeline import build_dag

    def extract_hash(cfg):
        return next(n.hash for n in build_dag(cfg) if n.id == "r1/extract")

    assert extract_hash(compose([override])) != extract_hash(compose())
