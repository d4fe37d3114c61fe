"""The extract stage with the committed tiny model: the extractor's own budget, how it reports cut-off answers, the
ending it is shown, and free-text experience."""
import pytest

pytest.importorskip("torch")

from oel_hpc.pipeline import build_dag  # noqa: E402
from oel_hpc.rundir import RunPaths, read_jsonl  # noqa: E402
from oel_hpc.stages import extract  # noqa: E402
from oel_hpc.stages.common import StageContext  # noqa: E402
from oel_hpc.summary import summary  # noqa: E402
from tests.conftest import compose  # noqa: E402


def run_extract(tmp_path, *overrides):
    cfg = compose([f"run.root={tmp_path}", "extract.seeds=1", "extract.steps=3", "extract.use_step=3",
                   "extract.eval_games=0", *overrides])
    paths = RunPaths(tmp_path / cfg.run.name)
    ctx = StageContext(cfg, paths, {n.id: n.hash for n in build_dag(cfg)})
    extract.run(ctx, 1, 0)
    rows = read_jsonl(paths.seed_dir(1, 0) / "games.jsonl")
    return cfg, paths, rows


def test_extractor_sees_the_ending_and_writes_items(tmp_path):
    cfg, paths, rows = run_extract(tmp_path)
    assert len(rows) == 3
    for row in rows:
        prompt = row["extractor_prompt"][-1]["content"]
        final_block = row["final_log"].split("\n\n")[-1]
        assert f"\n\nThen the game ended:\n{final_block}\nWhy it ended: " in prompt
        assert row["end_reason"] in ("goal", "hole", "turn_limit")
        assert ("Outcome: Success" in prompt) == row["success"] == (row["end_reason"] == "goal")
        assert row["extractor_truncated"] is False and row["extractor_tokens"] <= 48
    assert any(row["new_items"] for row in rows)
    assert (paths.experience(1, 0, 3)).read_text().startswith("- ")


def test_thinking_model_that_never_closes_its_reasoning_gives_no_experience(tmp_path, caplog):
    """The tiny model never writes </think>: with model.thinking=true every extractor answer is an unfinished
    reasoning, so nothing may be taken from it, and the run says so."""
    cfg, paths, rows = run_extract(tmp_path, "model.thinking=true")
    assert [row["extractor_truncated"] for row in rows] == [True, True, True]
    assert all(row["new_items"] == [] and "</think>" not in row["extractor_response"] for row in rows)
    assert any("- " in row["extractor_response"] for row in rows)  # it did write lines that look like items
    assert [paths.experience(1, 0, k).read_text() for k in (1, 2, 3)] == ["", "", ""]
    assert "3 of 3 extractor answers were cut off at extract.extractor_sampling.max_new_tokens=48" in caplog.text
    [line] = [x for x in summary(cfg, paths).splitlines() if x.startswith("extractor answers cut off")]
    assert line.split() == ["extractor", "answers", "cut", "off", "3", "of", "3", "(100", "%)"]
    [line] = [x for x in summary(cfg, paths).splitlines() if x.startswith("extraction steps with items")]
    assert line.split()[-5:] == ["0", "of", "3", "(0", "%)"]


def test_extractor_budget_is_its_own(tmp_path):
    """extract.extractor_sampling.max_new_tokens bounds the extractor's answer, not extract.sampling's."""
    _, _, rows = run_extract(tmp_path, "extract.extractor_sampling.max_new_tokens=3")
    assert all(row["extractor_tokens"] <= 3 for row in rows)
    assert any(row["extractor_truncated"] for row in rows)


def test_free_text_experience_is_the_whole_answers(tmp_path):
    _, paths, rows = run_extract(tmp_path, "experience.mode=free_text")
    answers = [row["extractor_response"].strip() for row in rows if not row["extractor_truncated"]]
    assert any(answers)
    assert [row["new_items"] for row in rows if not row["extractor_truncated"]] == [[a] for a in answers if a]
    assert "Put each lesson on its own line" not in rows[0]["extractor_prompt"][-1]["content"]
    assert paths.experience(1, 0, 3).read_text() == "\n\n".join(a for a in answers if a)
