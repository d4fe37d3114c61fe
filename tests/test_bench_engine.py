"""tools/bench_engine.py at a minimal size on the tiny model: the table rows it prints carry positive figures, its
JSON holds them, and without vLLM it says so in one line and still runs the HF column. No timing is asserted."""
from __future__ import annotations

import importlib.util
import json
import re
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_engine  # noqa: E402

MINIMAL = ["--shape", "tiny", "--device", "cpu", "--batch", "3", "--new-tokens", "6", "--games", "2", "--reps", "1"]
NUMBER = r"(\d+(?:\.\d+)?)"


def table_row(out: str, table: str, engine: str) -> list[str]:
    """The cells of `engine`'s row in the table whose caption starts with `table`."""
    section = out.split(f"\n{table}:", 1)[1].split("\n\n", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith(f"| {engine} ")]
    assert len(rows) == 1, section
    return [c.strip() for c in rows[0].strip("|").split("|")][1:]


def positive(cell: str) -> float:
    m = re.match(NUMBER, cell)
    assert m, cell
    assert float(m.group(1)) > 0, cell
    return float(m.group(1))


def check_engine(out: str, figures: dict, engine: str) -> None:
    start, warmup, generate, per_row, tokens_s, _, peak, _ = table_row(out, "generation", engine)
    for cell in (start, warmup, generate, per_row, tokens_s, peak):
        positive(cell)
    assert 0 < positive(per_row) <= 6  # at most --new-tokens per row
    time_s, games_s, _, turns, *_ = table_row(out, "rollout", engine)
    positive(time_s), positive(games_s), positive(turns)
    r = figures["engines"][engine]
    assert r["tokens_per_s"] > 0 and r["memory"]["peak_rss_bytes"] > r["memory"]["rss_before_load_bytes"] > 0
    assert r["rollout"]["games"] == 2 and r["rollout"]["games_per_s"] > 0
    assert all(0 < rep["tokens"] <= 3 * 6 for rep in r["reps"])


def test_hf_column_and_a_missing_vllm(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench_engine, "vllm_version", lambda: None)  # as where vLLM is not installed
    out_json = tmp_path / "bench.json"
    assert bench_engine.main(MINIMAL + ["--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert out.count("vLLM is not installed") == 1 and "vLLM not installed" in out  # the line, the header
    assert "| vllm " not in out
    figures = json.loads(out_json.read_text())
    check_engine(out, figures, "hf")
    assert figures["engines"]["vllm"] == {"engine": "vllm", "skipped": "vLLM is not installed"}
    assert figures["meta"]["batch"] == 3 and figures["meta"]["vllm"] is None


@pytest.mark.slow
def test_both_engines(tmp_path, capsys):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed")
    out_json = tmp_path / "bench.json"
    assert bench_engine.main(MINIMAL + ["--enforce-eager", "--cpu-kv-cache-mb", "64", "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    figures = json.loads(out_json.read_text())
    for engine in ("hf", "vllm"):
        check_engine(out, figures, engine)
    ratios = table_row(out, "generation", "vllm")
    positive(ratios[5].rstrip("×")), positive(ratios[7].rstrip("×"))  # vLLM/HF tokens/s and peak memory
    m = figures["engines"]["vllm"]["memory"]
    assert m["kv_cache_setting"] == "cpu_kv_cache_mb 64" and m["kv_tokens"] > 0
