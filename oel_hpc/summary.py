"""The table printed at the end of a run, read back from the run directory (so a no-op rerun prints it too)."""
from __future__ import annotations

from oel_hpc.rundir import RunPaths, read_json, read_jsonl


def _load(path):
    return read_json(path) if path.is_file() else None


def summary(cfg, paths: RunPaths) -> str:
    manifest = _load(paths.manifest) or {"stages": []}
    lines = [f"OEL run '{cfg.run.name}' — {paths.root}", "", f"{'stage':<16}{'state':<10}{'wall time':>11}"]
    for s in manifest["stages"]:
        seconds = f"{s['seconds']:.1f} s" if s.get("seconds") is not None else "-"
        lines.append(f"{s['id']:<16}{s['state']:<10}{seconds:>11}")
    lines += ["", f"{'':<30}" + "".join(f"{f'round {r}':>20}" for r in range(1, cfg.pipeline.rounds + 1))]

    def row(name, values):
        lines.append(f"{name:<30}" + "".join(f"{v:>20}" for v in values))

    rounds = range(1, cfg.pipeline.rounds + 1)
    evals = [(_load(paths.eval_result(r, 0)), _load(paths.eval_result(r, cfg.consolidate.steps))) for r in rounds]
    teachers = [b.get("teacher") if b else None for b, _ in evals]
    pct = lambda e: f"{100 * e['pass_rate']:.1f} %" if e else "-"  # noqa: E731
    valid = lambda e: f"{100 * (1 - e['invalid_rate']):.1f} %" if e else "-"  # noqa: E731
    row(f"pass rate before ({cfg.evaluate.games} games)", [pct(b) for b, _ in evals])
    row("pass rate after", [pct(a) for _, a in evals])
    row("pass rate with experience", [pct(t) for t in teachers])
    row("valid moves before", [valid(b) for b, _ in evals])
    row("valid moves after", [valid(a) for _, a in evals])
    row("valid moves with experience", [valid(t) for t in teachers])
    row("mean response tokens after", [f"{a['mean_response_tokens']:.1f}" if a else "-" for _, a in evals])
    metrics = [read_jsonl(paths.metrics(r)) if paths.metrics(r).is_file() else [] for r in rounds]
    row("consolidation KL, first step", [f"{m[0]['kl']:.4f}" if m else "-" for m in metrics])
    row("consolidation KL, last step", [f"{m[-1]['kl']:.4f}" if m else "-" for m in metrics])
    extraction = [_rows([paths.seed_dir(r, s) / "games.jsonl" for s in range(cfg.extract.seeds)]) for r in rounds]
    row("extraction steps with items", [_share(sum(bool(g["new_items"]) for g in rows), len(rows))
                                        for rows in extraction])
    row("extraction valid moves", [_share(sum(sum(g.get("valid", [])) for g in rows),
                                          sum(len(g.get("valid", [])) for g in rows))
                                   for rows in extraction])
    row("extractor answers cut off", [_share(sum(bool(g.get("extractor_truncated")) for g in rows), len(rows))
                                      for rows in extraction])
    lists = [_load(paths.experience_list(r)) for r in rounds]
    row("experience tokens per seed", [",".join(str(e["tokens"]) for e in lst) if lst else "-" for lst in lists])
    deploys = [_rows([paths.deploy_step(r, k) for k in range(1, cfg.deploy.steps + 1)]) for r in rounds]
    row("deploy valid moves", [_share(sum(t["valid"] for t in rows), len(rows)) for rows in deploys])
    return "\n".join(lines)


def _rows(files) -> list[dict]:
    return [row for f in files if f.is_file() for row in read_jsonl(f)]


def _share(n: int, total: int) -> str:
    """'n of total (p %)': both counts, so a share of few cases reads as such."""
    return f"{n} of {total} ({100 * n / total:.0f} %)" if total else "-"
