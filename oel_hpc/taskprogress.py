"""How far a running task is: step k of K and an ETA, read from the task's own records.

The source is the task's progress record (RunPaths.progress: progress.jsonl, one JSON row per unit of work done:
`{"done": k, "total": K, "unit": ..., "t": <unix time>}`, rewritten atomically). Where a task has none (written by
an older oel_hpc), what exists instead: consolidation's metrics.jsonl rows (one per step), extraction's
`experience_<k>.txt` files (one per step); their totals come from the run's config.yaml. Only the tail of a file is
read (a few KiB, whatever the file's length): the dashboard reads this for every running task on each refresh.
Never used to decide "done" (the DONE markers do that).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

TAIL_BYTES = 8192


def tail_lines(path: Path, max_bytes: int = TAIL_BYTES) -> list[str]:
    """The file's last whole lines within its last `max_bytes` bytes ([] when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            f.seek(start)
            data = f.read()
    except OSError:
        return []
    lines = data.decode("utf-8", errors="replace").splitlines()
    if start > 0 and lines:
        lines = lines[1:]  # cut in the middle
    return lines


def run_config(config_file: Path) -> dict:
    """A run's config.yaml as plain data; {} when it cannot be read (no totals then, so no ETA: never a wrong
    one). yaml is imported only here: the dashboard starts without it."""
    try:
        import yaml

        loaded = yaml.safe_load(config_file.read_text())
        return loaded if isinstance(loaded, dict) else {}
    except Exception:  # noqa: BLE001 - unreadable or not YAML
        return {}


def tail_rows(path: Path, max_bytes: int = TAIL_BYTES) -> list[dict]:
    """The JSON object rows among the file's last lines (a line that does not read as one is left out)."""
    return json_rows(tail_lines(path, max_bytes))


def json_rows(lines) -> list[dict]:
    """The lines that read as JSON objects (a record being rewritten, or cut by a tail, may have one that does not)."""
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _number(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def estimate(done: float, total: Optional[float], t_last: Optional[float], start: Optional[float], now: float,
             earlier: Optional[tuple[float, float]] = None) -> Optional[float]:
    """Seconds left: the time per unit (between an earlier (done, t) point and the last one, else since the task
    started) times the units left, counted from the last unit's time. None when it cannot be told."""
    if total is None or t_last is None or done >= total:
        return 0.0 if total is not None and done >= total else None
    per_unit = None
    if earlier is not None and done > earlier[0] and t_last >= earlier[1]:
        per_unit = (t_last - earlier[1]) / (done - earlier[0])
    elif start is not None and done > 0 and t_last >= start:
        per_unit = (t_last - start) / done
    if per_unit is None:
        return None
    return max(0.0, t_last + per_unit * (total - done) - now)


def from_record(path: Path, start: Optional[float], now: float) -> Optional[dict]:
    rows = [r for r in tail_rows(path) if _number(r.get("done")) is not None]
    if not rows:
        return None
    last = rows[-1]
    done, total, t_last = _number(last["done"]), _number(last.get("total")), _number(last.get("t"))
    first = rows[0] if len(rows) > 1 else None
    earlier = (_number(first["done"]), _number(first.get("t"))) if first is not None else None
    if earlier is not None and None in earlier:
        earlier = None
    return {"done": int(done), "total": int(total) if total is not None else None, "unit": last.get("unit"),
            "eta_s": estimate(done, total, t_last, start, now, earlier), "source": "progress.jsonl"}


def from_files(done: int, total: Optional[int], t_last: Optional[float], unit: str, source: str,
               start: Optional[float], now: float) -> dict:
    return {"done": done, "total": total, "unit": unit,
            "eta_s": estimate(done, total, t_last, start, now), "source": source}


def _mtime(path: Path) -> Optional[float]:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def task_progress(paths, r: int, stage: str, task: Optional[int], start: Optional[float], now: float,
                  config: Callable[[], dict]) -> Optional[dict]:
    """{done, total, unit, eta_s, source} of a running task, or None when nothing tells. `start`: when the task
    started (unix time), for an ETA from a single record; `config()`: the run's config (read only when needed)."""
    try:
        record = paths.progress(r, stage, task)
    except (KeyError, TypeError, ValueError):
        return None
    found = from_record(record, start, now)
    if found is not None:
        return found
    if stage == "consolidate":
        rows = [row for row in tail_rows(paths.metrics(r)) if _number(row.get("step")) is not None]
        if rows:
            total = _number((config().get("consolidate") or {}).get("steps"))
            return from_files(int(rows[-1]["step"]), int(total) if total else None, _mtime(paths.metrics(r)),
                              "step", "metrics.jsonl", start, now)
    if stage == "extract" and task is not None:
        steps, newest = [], None
        try:
            with os.scandir(paths.seed_dir(r, task)) as entries:
                for entry in entries:
                    name = entry.name
                    if name.startswith("experience_") and name.endswith(".txt") and name[11:-4].isdigit():
                        steps.append(int(name[11:-4]))
                        newest = max(newest or 0.0, entry.stat().st_mtime)
        except OSError:
            return None
        if steps:
            total = _number((config().get("extract") or {}).get("steps"))
            return from_files(max(steps), int(total) if total else None, newest, "step", "experience files",
                              start, now)
    return None


def fmt_seconds(s) -> str:
    """A duration as the dashboard shows it: `5s`, `1:15`, `1:02:03`, `1-1:01:01`; `-` for none."""
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.1f}s" if s != int(s) else f"{int(s)}s"
    s = int(round(s))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    text = f"{h}:{m:02d}:{s:02d}" if h or d else f"{m}:{s:02d}"
    return f"{d}-{text}" if d else text
