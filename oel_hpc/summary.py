"""The table printed at the end of a run, read back from the run directory (so a no-op rerun prints it too)."""
from __future__ import annotations

import json

from oel_hpc.rundir import RunPaths, read_jsonl


def _load(path):
    return json.loads(path.read_text()) if path.is_file() else None


def summary(cfg, paths: RunPaths) -> str:
    manifest = _load(paths.manifest) or {"stages": []}
    lines = [f"OEL run '{cfg.run.name}' — {paths.root}", "", f"{'stage':<16}{'state':<10}{'wall time':>11}"]
    for s in manifest["stages"]:
        seconds = f"{s['seconds']:.1f} s" if s.get("seconds") is not None else "-"
        lines.append(f"{s['id']:<16}{s['state']:<10}{seconds:>11}")
    lines += ["", f"{'':<30}" + "".join(f"{f'round {r}':>16}" for r in range(1, cfg.pipeline.rounds + 1))]

    def row(name, values):
        lines.append(f"{name:<30}" + "".join(f"{v:>16}" for v in values))

    rounds = range(1, cfg.pipeline.rounds + 1)
    evals = [(_load(paths.eval_result(r, 0)), _load(paths.eval_result(r, cfg.consolidate.steps))) for r in rounds]
    pct = lambda e: f"{100 * e['pass_rate']:.1f} %" if e else "-"  # noqa: E731
    row(f"pass rate before ({cfg.evaluate.games} games)", [pct(b) for b, _ in evals])
    row("pass rate after", [pct(a) for _, a in evals])
    row("mean response tokens after", [f"{a['mean_response_tokens']:.1f}" if a else "-" for _, a in evals])
    metrics = [read_jsonl(paths.metrics(r)) if paths.metrics(r).is_file() else [] for r in rounds]
    row("consolidation KL, first step", [f"{m[0]['kl']:.4f}" if m else "-" for m in metrics])
    row("consolidation KL, last step", [f"{m[-1]['kl']:.4f}" if m else "-" for m in metrics])
    lists = [_load(paths.experience_list(r)) for r in rounds]
    row("experience tokens per seed", [",".join(str(e["tokens"]) for e in lst) if lst else "-" for lst in lists])
    row("extractor answers cut off", [_cut_off(paths, r, cfg.extract.seeds) for r in rounds])
    return "\n".join(lines)


def _cut_off(paths: RunPaths, r: int, seeds: int) -> str:
    """How many extractor answers of round r hit extract.extractor_sampling.max_new_tokens, of how many."""
    files = [paths.seed_dir(r, s) / "games.jsonl" for s in range(seeds)]
    rows = [row for f in files if f.is_file() for row in read_jsonl(f)]
    return f"{sum(bool(row.get('extractor_truncated')) for row in rows)} of {len(rows)}" if rows else "-"
