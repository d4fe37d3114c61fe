"""Rendered prompts against hand-written expectations, and what happens when a prompt exceeds its budget."""
import pytest
from omegaconf import OmegaConf

from oel_hpc.config import CONF_DIR, ConfigError
from oel_hpc.prompts import PromptBuilder, PromptTooLong, check_template

TEMPLATES = OmegaConf.load(CONF_DIR / "prompts" / "default.yaml")
ACTIONS = ("[up]", "[down]", "[left]", "[right]")
BLOCKS = ["Turn 1:\nP _ _\n_ _ H\nH _ G", "Action: [right]\nYou moved right.\nTurn 2:\n_ P _\n_ _ H\nH _ G"]


def words(messages):  # a stand-in tokenizer: one token per whitespace-separated word
    return sum(len(m["content"].split()) for m in messages)


def builder(turn_budget=10_000, extractor_budget=10_000):
    return PromptBuilder(TEMPLATES, words, turn_budget, extractor_budget)


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


def test_no_rule_or_legend_is_told():
    text = builder().game_turn(BLOCKS, ACTIONS)[0]["content"].lower()
    for leak in ("hole", "h is", "g is", "goal is", "frozen", "ice"):
        assert leak not in text


def test_extractor_prompt():
    [msg] = builder().extractor([("Turn 1:\nP _ _", "I go [down]")], "Failure", "- ", previous="- Old lesson.")
    assert msg["content"] == (
        "You played a grid game as P. This is what you saw and answered, turn by turn:\n"
        "Turn 1:\nP _ _\nYou answered: I go [down]\n"
        "Outcome: Failure\n"
        "Lessons you already wrote:\n- Old lesson.\n"
        'Write one or two short, general lessons that would help you win next time. Put each lesson on its own '
        'line, starting with "- ".')


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


def test_extractor_over_budget_drops_oldest_turns():
    turns = [(f"Turn {i}:\nboard", "answer " * 20) for i in range(1, 6)]
    full = words(builder().extractor(turns, "Success", "- "))
    [msg] = builder(extractor_budget=full - 10).extractor(turns, "Success", "- ")
    assert "(earlier turns omitted)" in msg["content"] and "Outcome: Success" in msg["content"]


@pytest.mark.parametrize("name,text,match", [
    ("game_turn", "{actions} {game_log}", "missing placeholder"),
    ("game_turn", "{actions} {experience_block} {game_log} {gamelog}", "unknown placeholder"),
    ("experience_block", "{experience", "not a valid template"),
])
def test_bad_templates_are_config_errors(name, text, match):
    with pytest.raises(ConfigError, match=match) as e:
        check_template(name, text)
    assert e.value.key == f"prompts.{name}"
