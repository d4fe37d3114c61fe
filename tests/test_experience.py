import json

import pytest

from oel_hpc import experience as exp
from oel_hpc.config import ConfigError


def chars(text):  # a stand-in token counter
    return len(text)


def test_parse_items_by_marker():
    answer = "Sure.\n- Holes end the game.\n  - Go right first.\nnot an item\n-\n- \n* other bullet"
    assert exp.parse_items(answer, "- ") == ["Holes end the game.", "Go right first."]


def test_parse_items_ignores_drafts_inside_thinking():
    answer = "<think>\n- draft idea\n</think>\n- Final lesson."
    assert exp.parse_items(answer, "- ") == ["Final lesson."]


def test_parse_items_custom_marker():
    assert exp.parse_items("EXP: a\nEXP:b\n- c", "EXP: ") == ["a", "b"]


def test_parse_items_marker_anywhere_is_the_authors_rule():
    marker = "- EXPERIENCE ITEM:"
    answer = ("Here: - EXPERIENCE ITEM: Holes end the game. - EXPERIENCE ITEM: Go right.\n"
              "- EXPERIENCE ITEM:\nplain line\n  - EXPERIENCE ITEM: Down is safe.")
    assert exp.parse_items(answer, marker, "marker_anywhere") == ["Holes end the game.", "Go right.", "Down is safe."]
    # the line-start rule misses the item that does not open its line
    assert exp.parse_items(answer, marker) == ["Down is safe."]


def test_parse_items_list_takes_any_bullet_or_number():
    answer = ("Here are two lessons:\n\n1. Avoid H.\n2) Move toward G.\n* Bulleted.\n• Dot.\n- Dash.\n"
              "+ Plus.\n1.5 is not a list item\n-no space\n3.\n12. Twelfth.")
    assert exp.parse_items(answer, "- ", "list") == ["Avoid H.", "Move toward G.", "Bulleted.", "Dot.", "Dash.",
                                                     "Plus.", "Twelfth."]


def test_parse_style_is_checked():
    with pytest.raises(ValueError, match="experience.parse"):
        exp.parse_items("- a", "- ", "bullets")
    with pytest.raises(ValueError, match="experience.parse"):
        exp.ExperienceFormat("items", "- ", "bullets")


def test_list_items_are_written_back_with_the_marker():
    fmt = exp.ExperienceFormat("items", "- ", "list")
    reading = fmt.read("1. Avoid H.\n2. Go down.\n", finished=True, thinking=False)
    assert reading.items == ["Avoid H.", "Go down."]
    assert fmt.render(reading.items) == "- Avoid H.\n- Go down."


def test_render_round_trips():
    items = ["one", "two three"]
    assert exp.parse_items(exp.render(items, "- "), "- ") == items


def test_append_capped_keeps_newest_complete_items():
    items = ["a" * 10, "b" * 10]
    new = ["c" * 10]
    # each rendered item is 12 chars, joined by newlines: two items = 25 chars
    assert exp.append_capped(items, new, "- ", 25, chars) == ["b" * 10, "c" * 10]
    assert exp.append_capped(items, new, "- ", 24, chars) == ["c" * 10]
    assert exp.append_capped(items, new, "- ", 1000, chars) == items + new


def test_append_capped_never_cuts_an_item():
    kept = exp.append_capped([], ["x" * 50], "- ", 10, chars)
    assert kept == []  # too long to fit whole: dropped, not truncated


ITEMS = exp.ExperienceFormat("items", "- ")
FREE = exp.ExperienceFormat("free_text")


@pytest.mark.parametrize("fmt", [ITEMS, FREE])
def test_thinking_that_never_closed_is_not_an_answer(fmt):
    """A thinking model that ran out of tokens while reasoning: its drafts are not experience."""
    reading = fmt.read("<think>\nMaybe:\n- H is a hole\nand then", finished=False, thinking=True)
    assert reading == exp.Reading([], truncated=True)
    reading = fmt.read("- H is a hole", finished=True, thinking=True)  # stopped, but never closed its reasoning
    assert reading == exp.Reading([], truncated=True)


def test_items_after_closed_thinking():
    reading = ITEMS.read("<think>\n- draft\n</think>\n- Holes end the game.\n- Go right.", finished=True,
                         thinking=True)
    assert reading == exp.Reading(["Holes end the game.", "Go right."], truncated=False)


def test_items_cut_off_keep_their_complete_lines_only():
    reading = ITEMS.read("- Holes end the game.\n- Go ri", finished=False, thinking=False)
    assert reading == exp.Reading(["Holes end the game."], truncated=True)
    reading = ITEMS.read("- Holes end the game.\n", finished=False, thinking=False)  # cut right after a line
    assert reading == exp.Reading(["Holes end the game."], truncated=True)
    assert ITEMS.read("- Holes end", finished=False, thinking=False) == exp.Reading([], truncated=True)


def test_free_text_is_the_whole_answer():
    answer = "<think>\nlet me see\n</think>\n\nThe H cells end the game.\n\n- Go right, then down.\n"
    assert FREE.read(answer, finished=True, thinking=True) == exp.Reading(
        ["The H cells end the game.\n\n- Go right, then down."], truncated=False)
    assert FREE.read("  Walk around holes.  ", finished=True, thinking=False) == exp.Reading(
        ["Walk around holes."], truncated=False)
    assert FREE.read("\n \n", finished=True, thinking=False) == exp.Reading([], truncated=False)


def test_free_text_cut_off_gives_nothing():
    assert FREE.read("<think>ok</think>The H cells end the ga", finished=False, thinking=True) == exp.Reading(
        [], truncated=True)
    assert FREE.read("The H cells end the ga", finished=False, thinking=False) == exp.Reading([], truncated=True)


def test_free_text_renders_answers_a_blank_line_apart_and_caps_whole_answers():
    answers = ["a" * 10, "b\n" + "b" * 8, "c" * 10]  # 10 characters each
    assert FREE.render(answers) == "aaaaaaaaaa\n\nb\nbbbbbbbb\n\ncccccccccc"
    # the two newest with their blank line: 10 + 2 + 10 = 22 characters
    assert FREE.append_capped(answers[:2], answers[2:], 22, chars) == answers[1:]
    assert FREE.append_capped(answers[:2], answers[2:], 21, chars) == answers[2:]
    assert FREE.append_capped([], ["x" * 50], 10, chars) == []  # too long to keep whole: not cut


def test_items_format_renders_and_caps_as_the_item_functions():
    assert ITEMS.render(["one", "two"]) == "- one\n- two"
    assert ITEMS.append_capped(["a" * 10, "b" * 10], ["c" * 10], 25, chars) == ["b" * 10, "c" * 10]


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="free_text"):
        exp.ExperienceFormat("lines")


def _write_list(tmp_path, texts):
    rows = []
    for i, t in enumerate(texts):
        p = tmp_path / f"e{i}.txt"
        p.write_text(t)
        rows.append({"seed": i, "step": 1, "path": p.name, "sha256": exp.sha256_text(t), "tokens": len(t)})
    (tmp_path / "list.json").write_text(json.dumps(rows))
    return tmp_path / "list.json"


def test_load_experience_list(tmp_path):
    entries, texts = exp.load_experience_list(_write_list(tmp_path, ["- a", ""]), tmp_path)
    assert texts == ["- a", ""] and entries[0].seed == 0


def test_load_experience_list_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has the gather stage run"):
        exp.load_experience_list(tmp_path / "missing.json", tmp_path)
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match="has no entries"):
        exp.load_experience_list(tmp_path / "empty.json", tmp_path)
    lst = _write_list(tmp_path, ["- a"])
    (tmp_path / "e0.txt").write_text("- changed")
    with pytest.raises(ValueError, match="changed since"):
        exp.load_experience_list(lst, tmp_path)
    (tmp_path / "e0.txt").unlink()
    with pytest.raises(FileNotFoundError, match="e0.txt"):
        exp.load_experience_list(lst, tmp_path)


def test_read_source_text_and_json(tmp_path):
    (tmp_path / "a.txt").write_text("- lesson")
    (tmp_path / "list.txt").write_text("a.txt\n\n")
    assert [t for _, t in exp.read_source(tmp_path / "list.txt")] == ["- lesson"]
    lst = _write_list(tmp_path, ["- x", "- y"])
    assert [t for _, t in exp.read_source(lst)] == ["- x", "- y"]


@pytest.mark.parametrize("content,files,match", [
    (None, {}, "does not exist"),
    ("", {}, "has no entries"),
    ("nope.txt", {}, "nope.txt .*does not exist"),
    ("a.txt\nb.txt", {"a.txt": "", "b.txt": "  \n"}, "every experience file .* is empty"),
])
def test_read_source_errors_name_the_key_and_file(tmp_path, content, files, match):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    if content is not None:
        (tmp_path / "list.txt").write_text(content)
    with pytest.raises(ConfigError, match=match) as e:
        exp.read_source(tmp_path / "list.txt")
    assert e.value.key == "gather.source"
