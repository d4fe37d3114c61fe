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
