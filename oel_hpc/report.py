"""The HTML report (`python -m oel_hpc.status RUN... --html FILE`): one self-contained page, no server, no network
(inline SVG and CSS, no script), with the stage tables of oel_hpc.status and plots read from the run directories:

- pass rate before / after each round, and per evaluated checkpoint (round_<r>/eval/step_<k>.json);
- consolidation KL, student / teacher entropy and grad norm per step (round_<r>/consolidate/metrics.jsonl);
- experience items and tokens per extraction step (the seeds' progress.jsonl rows; where a seed has none, its
  experience_<k>.txt files: items parsed as oel_hpc.experience does, size in characters, said on the plot), and the
  held-out pass rate during extraction where it was measured (scores.jsonl);
- a job timeline: queued (submit → start) and running (start → end) per task from sacct's times; a local run, per
  stage from the manifest's times;
- several runs (a sweep): one colour per run, every plot overlaid, a legend.

Every string from a file (run names, log lines, notes) is escaped.
"""
from __future__ import annotations

import json
import time
from datetime import datetime
from html import escape
from pathlib import Path
from typing import Optional

from oel_hpc import experience as exp
from oel_hpc import svgplot, taskprogress
from oel_hpc.rundir import RunPaths, write_text_atomic
from oel_hpc.taskprogress import fmt_seconds

MANY_SEEDS = 8  # more seeds than this: the mean over seeds per step instead of one line per seed
TIMELINE_TASKS = 200  # more tasks than this: one bar per stage instead of one per task


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        text = path.read_text()
    except OSError:
        return []
    return taskprogress.json_rows(text.splitlines())


def _rounds(report: dict) -> list[int]:
    return sorted({int(s["round"]) for s in report["stages"] if isinstance(s.get("round"), int)})


def _tasks(report: dict, r: int, stage: str) -> list:
    for s in report["stages"]:
        if s.get("round") == r and s.get("stage") == stage:
            return [t["task"] for t in s["tasks"]]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Reading a run's measures

def evaluations(paths: RunPaths, r: int, steps: list) -> list[tuple[int, float]]:
    points = []
    for step in steps:
        data = _read_json(paths.eval_result(r, step)) if step is not None else None
        if isinstance(data, dict) and isinstance(data.get("pass_rate"), (int, float)):
            points.append((int(step), float(data["pass_rate"])))
    return sorted(points)


def extraction(paths: RunPaths, r: int, seed: int, config: dict) -> dict:
    """{items: [(step, n)], size: [(step, n)], size_unit, heldout: [(step, pass_rate)]} of one seed."""
    rows = _read_jsonl(paths.progress(r, "extract", seed))
    out = {"items": [], "size": [], "size_unit": "tokens", "heldout": []}
    if rows:
        for row in rows:
            step = row.get("done")
            if isinstance(step, (int, float)):
                out["items"].append((step, row.get("experience_items")))
                out["size"].append((step, row.get("experience_tokens")))
                if row.get("heldout_pass_rate") is not None:
                    out["heldout"].append((step, row["heldout_pass_rate"]))
    else:  # no progress record (an older run): the experience files themselves
        ecfg = config.get("experience") or {}
        marker, mode = ecfg.get("marker", "- "), ecfg.get("mode", "items")
        out["size_unit"] = "characters"
        seed_dir = paths.seed_dir(r, seed)
        try:
            names = [p.name for p in seed_dir.iterdir()]
        except OSError:
            names = []
        for name in names:
            if name.startswith("experience_") and name.endswith(".txt") and name[11:-4].isdigit():
                try:
                    text = (seed_dir / name).read_text()
                except OSError:
                    continue
                items = len(exp.parse_items(text, marker, "marker")) if mode == "items" else int(bool(text.strip()))
                out["items"].append((int(name[11:-4]), items))
                out["size"].append((int(name[11:-4]), len(text)))
    # a finished seed's scores.jsonl (step k = the experience after k updates, played on the held-out games) also
    # has step 0, which the progress record (one row per step done) has not: it wins where it exists
    scores = _read_jsonl(paths.seed_dir(r, seed) / "scores.jsonl")
    heldout = [(row["step"], row["pass_rate"]) for row in scores
               if isinstance(row.get("step"), (int, float)) and row.get("pass_rate") is not None]
    if heldout:
        out["heldout"] = heldout
    return out


def _mean_by_step(curves: list[list[tuple]]) -> list[tuple[float, float]]:
    sums: dict = {}
    for curve in curves:
        for x, y in curve:
            if isinstance(y, (int, float)):
                total, n = sums.get(x, (0.0, 0))
                sums[x] = (total + y, n + 1)
    return sorted((x, total / n) for x, (total, n) in sums.items())


def _ts(iso: Optional[str]) -> Optional[float]:
    if not iso:
        return None
    for parse in (datetime.fromisoformat, lambda s: datetime.strptime(s, "%Y-%m-%dT%H:%M:%S%z")):
        try:
            return parse(iso).timestamp()
        except ValueError:
            continue
    return None


def timeline_bars(report: dict, colour: str) -> tuple[list[dict], str]:
    """Per task from Slurm's submit / start / end; a local run (or too many tasks): per stage."""
    tasks = [(s, t) for s in report["stages"] for t in s["tasks"]]
    slurm = [(s, t) for s, t in tasks if t.get("start") or t.get("submit")]
    prefix = report["run"] + " " if report.get("_several") else ""
    if slurm and len(slurm) <= TIMELINE_TASKS:
        return [{"label": f"{prefix}{s['id']} {t['label'] if t['task'] is not None else ''}".strip(),
                 "submit": _ts(t.get("submit")), "start": _ts(t.get("start")),
                 "end": _ts(t.get("end")) if t.get("end") else (time.time() if t.get("start") else None),
                 "colour": colour} for s, t in slurm], "per task (sacct submit, start, end)"
    bars = []
    for s in report["stages"]:
        rows = s["tasks"]
        submit = [x for x in (_ts(t.get("submit")) for t in rows) if x is not None]
        start = [x for x in (_ts(t.get("start")) for t in rows) if x is not None]
        end = [x for x in (_ts(t.get("end")) for t in rows) if x is not None]
        if start or submit:
            bars.append({"label": f"{prefix}{s['id']}", "submit": min(submit) if submit else None,
                         "start": min(start) if start else None, "end": max(end) if end else None,
                         "colour": colour})
        elif s.get("started"):
            bars.append({"label": f"{prefix}{s['id']}", "start": _ts(s["started"]), "end": _ts(s.get("ended")),
                         "colour": colour})
    how = "per stage (first start to last end of its tasks)" if slurm else "per stage (local run: manifest times)"
    return bars, how


# ---------------------------------------------------------------------------------------------------------------
# The page

CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:20px;color:#222}
h1{font-size:20px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:15px}
table{border-collapse:collapse;font-size:12px;margin:6px 0 14px}td,th{border:1px solid #ddd;padding:2px 6px;
text-align:left}th{background:#f4f4f4}.done{color:#1a7f37}.failed,.damaged,.blocked,.changed{color:#b42318;
font-weight:bold}.running{color:#0550ae;font-weight:bold}.pending{color:#7d4e00}.plots{display:flex;flex-wrap:wrap;
gap:12px}svg.plot{border:1px solid #ddd}pre{background:#f6f8fa;padding:6px;font-size:11px;overflow-x:auto}
.muted{color:#666;font-size:12px}"""


def _stage_table(report: dict) -> str:
    out = ['<table class="stages"><tr><th>stage</th><th>state</th><th>tasks done</th><th>running</th>'
           '<th>pending</th><th>failed</th><th>wall time</th><th>jobs</th></tr>']
    for s in report["stages"]:
        rows = s["tasks"]
        count = {k: sum(t["state"] == k for t in rows) for k in ("done", "running", "pending", "failed")}
        out.append(f'<tr><td>{escape(str(s["id"]))}</td><td class="{escape(s["state"])}">{escape(s["state"])}</td>'
                   f'<td>{count["done"]}/{len(rows)}</td><td>{count["running"]}</td><td>{count["pending"]}</td>'
                   f'<td>{count["failed"]}</td><td>{escape(fmt_seconds(s["seconds"]))}</td>'
                   f'<td>{escape(", ".join(s["job_ids"][-3:]))}</td></tr>')
    out.append("</table>")
    failed = [(s, t) for s in report["stages"] for t in s["tasks"] if t["state"] in ("failed", "damaged")]
    for s, t in failed[:20]:
        task = "" if t["task"] is None else f' {t["label"]}'
        out.append(f'<p><b>{escape(str(s["id"]) + task)}</b>: <span class="{escape(t["state"])}">'
                   f'{escape(t["state"])}</span> (job {escape(str(t.get("job_id") or "-"))})'
                   f' {escape(str(t.get("note") or ""))} {escape(str(t.get("log") or ""))}</p>')
        if t.get("log_tail"):
            out.append(f'<pre>{escape(chr(10).join(t["log_tail"]))}</pre>')
    running = [(s, t) for s in report["stages"] for t in s["tasks"] if t.get("progress")]
    if running:
        out.append('<table><tr><th>running task</th><th>progress</th><th>ETA</th></tr>')
        for s, t in running[:50]:
            p = t["progress"]
            out.append(f'<tr><td>{escape(str(s["id"]))} {escape(str(t["label"]))}</td><td>{p["done"]}/'
                       f'{escape(str(p.get("total")))} {escape(str(p.get("unit") or ""))}</td>'
                       f'<td>{escape(fmt_seconds(p.get("eta_s")))}</td></tr>')
        out.append("</table>")
    return "\n".join(out)


def _style(run_i: int, r_i: int, several: bool) -> dict:
    """Several runs: the colour says the run, the dash the round; one run: the colour says the round."""
    if several:
        return {"colour": svgplot.colour(run_i), "dash": svgplot.DASHES[r_i % len(svgplot.DASHES)]}
    return {"colour": svgplot.colour(r_i), "dash": ""}


def build(reports: list[dict], sweep: Optional[dict] = None) -> str:
    """The page's HTML text."""
    several = len(reports) > 1
    names = [str(r.get("run")) for r in reports]
    runs = []
    for report in reports:
        paths = RunPaths(Path(report["run_dir"]))
        runs.append((report, paths, taskprogress.run_config(paths.config)))

    plots: dict[str, list] = {k: [] for k in ("before_after", "kl", "student_entropy", "teacher_entropy",
                                              "grad_norm", "items", "size", "heldout")}
    per_round_eval: dict[int, list] = {}
    size_units, seed_notes = set(), set()
    for i, (report, paths, config) in enumerate(runs):
        label = names[i] if several else ""
        before, after = [], []
        for r_i, r in enumerate(_rounds(report)):
            tag = f"{label} r{r}".strip()
            style = _style(i, r_i, several)
            evals = evaluations(paths, r, _tasks(report, r, "evaluate"))
            if evals:
                per_round_eval.setdefault(r, []).append({"name": label or f"round {r}", "points": evals,
                                                         **_style(i, 0, several)})
                before.append((r, evals[0][1]))
                if len(evals) > 1:
                    after.append((r, evals[-1][1]))
            metrics = _read_jsonl(paths.metrics(r))
            for key in ("kl", "student_entropy", "teacher_entropy", "grad_norm"):
                plots[key].append({"name": tag, "points": [(m.get("step"), m.get(key)) for m in metrics], **style})
            seeds = [s for s in _tasks(report, r, "extract") if s is not None]
            per_seed = {s: extraction(paths, r, s, config) for s in seeds}
            size_units |= {v["size_unit"] for v in per_seed.values() if v["size"]}
            if len(seeds) > MANY_SEEDS or several:
                seed_notes.add(f"mean over seeds ({len(seeds)} seeds)" if seeds else "")
                for key in ("items", "size", "heldout"):
                    plots[key].append({"name": tag + " (mean)", "points": _mean_by_step([v[key] for v in
                                                                                          per_seed.values()]),
                                       **style})
            else:
                for j, (s, v) in enumerate(per_seed.items()):
                    for key in ("items", "size", "heldout"):
                        plots[key].append({"name": f"{tag} seed {s}".strip(), "points": v[key],
                                           "colour": svgplot.colour(r_i * len(seeds) + j), "dash": ""})
        plots["before_after"].append({"name": f"{label} before".strip(), "points": before,
                                      "colour": svgplot.colour(i if several else 0), "dash": "6 3"})
        plots["before_after"].append({"name": f"{label} after".strip(), "points": after,
                                      "colour": svgplot.colour(i if several else 1), "dash": ""})

    unit = " / ".join(sorted(size_units)) or "tokens"
    size_note = ("characters: no progress record with token counts" if "characters" in size_units else
                 "tokens: the model's tokenizer (progress.jsonl)")
    seeds_note = "; ".join(sorted(n for n in seed_notes if n)) or "one line per seed"
    svgs = ['<h2>Pass rate</h2><div class="plots">',
            svgplot.line_plot("plot-pass-before-after", "Pass rate before / after each round", "round",
                              "pass rate (fraction of games won)", plots["before_after"], y_range=(0, 1),
                              note="before: first evaluated checkpoint; after: last")]
    for r, series in sorted(per_round_eval.items()):
        svgs.append(svgplot.line_plot(f"plot-eval-r{r}", f"Round {r}: pass rate per evaluated checkpoint",
                                      "consolidation step", "pass rate", series, y_range=(0, 1)))
    svgs += ['</div><h2>Consolidation</h2><div class="plots">',
             svgplot.line_plot("plot-kl", "KL(teacher || student) per step", "consolidation step", "KL (nats/token)",
                               plots["kl"]),
             svgplot.line_plot("plot-entropy", "Student and teacher entropy per step", "consolidation step",
                               "entropy (nats/token)",
                               [dict(s, name=f"{s['name']} student".strip()) for s in plots["student_entropy"]]
                               + [dict(s, name=f"{s['name']} teacher".strip(), dash="2 3")
                                  for s in plots["teacher_entropy"]]),
             svgplot.line_plot("plot-grad-norm", "Gradient norm per step", "consolidation step",
                               "grad norm (before clipping)", plots["grad_norm"]),
             '</div><h2>Extraction</h2><div class="plots">',
             svgplot.line_plot("plot-experience-items", "Experience items per extraction step", "extraction step",
                               "items", plots["items"], note=seeds_note),
             svgplot.line_plot("plot-experience-size", f"Experience size per extraction step ({unit})",
                               "extraction step", unit, plots["size"], note=size_note),
             svgplot.line_plot("plot-heldout", "Held-out pass rate during extraction", "experience after step",
                               "pass rate", plots["heldout"], y_range=(0, 1),
                               note="where extract.eval_games > 0"),
             "</div><h2>Jobs</h2>"]
    bars, hows = [], set()
    for i, report in enumerate(reports):
        report = dict(report, _several=several)
        these, how = timeline_bars(report, svgplot.colour(i if several else 0))
        bars += these
        hows.add(how)
    svgs.append(svgplot.timeline("plot-timeline", "Job timeline: queued and running, " + "; ".join(sorted(hows)),
                                 bars))

    title = (f"sweep {sweep.get('sweep')}" if sweep else ", ".join(names)) + " — OEL report"
    head = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>", f"<h1>{escape(title)}</h1>",
            f'<p class="muted">written {escape(datetime.now().astimezone().isoformat(timespec="seconds"))} by '
            f'python -m oel_hpc.status; a snapshot: write it again to refresh</p>']
    if sweep:
        head.append(f'<p>parameters: {escape(json.dumps(sweep.get("params")))}</p>')
    for i, report in enumerate(reports):
        swatch = f'<span style="color:{svgplot.colour(i)}">&#9632;</span> ' if several else ""
        head.append(f'<h2>{swatch}run {escape(str(report.get("run")))}</h2>'
                    f'<p class="muted">{escape(str(report["run_dir"]))}</p>')
        if report.get("note"):
            head.append(f"<p>{escape(report['note'])}</p>")
        head.append(_stage_table(report))
    return "\n".join(head + svgs + ["</body></html>"])


def write(path: Path, reports: list[dict], sweep: Optional[dict] = None) -> None:
    write_text_atomic(Path(path), build(reports, sweep))
