"""Hydra sweeps (`python -m oel_hpc -m key=a,b other=x,y`): the points, their run names, the sweep record.

The points are the cartesian product Hydra's basic sweeper makes, expanded with Hydra's own override parser (so
`range()`, `choice()`, `glob()`, quoted commas work as in Hydra). A sweep of base run name N lives in the folder
`<run.root>/N/`: `sweep.json` (the record, docs/sweeps.md) and one run directory per point, `<run.root>/N/<point>`,
whose run.name is `N/<point>`. `<point>` is made from the swept values only (`lr-1e-06_experiment-tiny`), so the
same command gives the same names; a value that does not fit a folder name, or a name too long, is shortened and
made unique with a short hash of the exact values.

Torch-free: the launcher composes and validates every point before it writes or submits anything.
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from oel_hpc.errors import ConfigError
from oel_hpc.rundir import write_json_atomic

RECORD = "sweep.json"
POINT_MAX = 64  # characters of a point's folder name; the sweep's own name comes on top (run.name ≤ RUN_NAME_MAX)
VALUE_MAX = 32  # one value's share of a point name before it is shortened
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
# the last part of a key that holds a secret (wandb.api_key, hf_token, ...); not max_tokens / tokens_per_turn
_SECRET_KEY = re.compile(r"(api_?key|(^|_)token|secret|passw(or)?d)$", re.IGNORECASE)
_SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN")
REDACTED = "<redacted>"


@dataclass
class Point:
    overrides: list[str]  # the whole command line of this point (without -m), in the order typed
    params: dict[str, str]  # swept key → this point's value, as Hydra writes it
    name: str = ""  # the folder name inside the sweep folder


@dataclass
class Sweep:
    params: dict[str, list[str]]  # swept key → its values, in the order typed
    points: list[Point] = field(default_factory=list)


def _parser():
    """Hydra's override parser, with a config loader so `glob()` over a config group sees its options."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from oel_hpc.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())


def expand(overrides: list[str]) -> Optional[Sweep]:
    """The sweep `overrides` describe, or None when no override sweeps (one run, not a sweep). As Hydra's basic
    sweeper: one list per key (a key given twice keeps its first place and its last value), their product in the
    order typed; a value Hydra cannot sweep (an interval) is refused."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        parsed = _parser().parse_overrides(overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError("overrides", str(e).splitlines()[0]) from None
    if not any(o.is_sweep_override() for o in parsed):
        return None
    choices: dict[str, list[str]] = {}  # key → its override strings, one per value
    params: dict[str, list[str]] = {}
    for text, o in zip(overrides, parsed):
        key = o.get_key_element()
        if o.is_sweep_override():
            if not o.is_discrete_sweep():
                raise ConfigError(key, "an interval() cannot be swept by a grid: list the values, or use range()")
            values = [str(v) for v in o.sweep_string_iterator()]
            if not values:
                raise ConfigError(key, "the sweep lists no value")
            dup = next((v for i, v in enumerate(values) if v in values[:i]), None)
            if dup is not None:
                raise ConfigError(key, f"value {dup} appears twice in the sweep")
            choices[key] = [f"{key}={v}" for v in values]
            params[key] = values
        else:
            choices[key] = [text]
            params.pop(key, None)
    for key in params:
        if _plain(key) == "run.name":
            raise ConfigError("run.name", "cannot be swept: it names the sweep (each point gets its own name)")
    sweep = Sweep(params={k: params[k] for k in choices if k in params})
    for combo in itertools.product(*choices.values()):
        values = {k: combo_value for k, combo_value in zip(choices, combo)}
        sweep.points.append(Point(overrides=list(combo),
                                  params={k: values[k].split("=", 1)[1] for k in sweep.params}))
    names = point_names([p.params for p in sweep.points])
    for p, name in zip(sweep.points, names):
        p.name = name
    return sweep


def _plain(key: str) -> str:
    """A key without Hydra's +/~ prefixes and @package suffix."""
    return key.lstrip("+~").split("@", 1)[0]


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:6]


def _labels(keys: list[str]) -> dict[str, str]:
    """Each swept key's label in a point name: its last part (`consolidate.lr` → `lr`, `hydra/launcher` →
    `launcher`), or the whole key where two keys share that last part."""
    last = {k: re.split(r"[./]", _plain(k))[-1] for k in keys}
    return {k: last[k] if list(last.values()).count(last[k]) == 1 else _UNSAFE.sub("-", _plain(k)) for k in keys}


def _value_part(value: str) -> str:
    safe = _UNSAFE.sub("-", value)
    if safe == value and len(value) <= VALUE_MAX:
        return value
    # lossy (a '/', a space, a quote) or long: a readable start plus a hash of the exact value keeps it unique
    start = safe[:VALUE_MAX - 7].strip("-")
    return f"{start}-{_hash(value)}" if start else _hash(value)


def point_names(points: list[dict[str, str]]) -> list[str]:
    """A folder name per point: `<label>-<value>` per swept key joined by '_', in the order typed. Stable (the
    same values give the same name), made of letters, digits, '.', '_' and '-', at most POINT_MAX characters."""
    if not points:
        return []
    labels = _labels(list(points[0]))
    names = []
    for params in points:
        name = "_".join(f"{labels[k]}-{_value_part(v)}" for k, v in params.items())
        if len(name) > POINT_MAX:
            name = f"{name[:POINT_MAX - 7].rstrip('-._')}-{_hash(json.dumps(params, sort_keys=True))}"
        names.append(name)
    # '_' joins the keys but may also be in a value: two points could then read alike; they never share a folder
    clash = {n for n in names if names.count(n) > 1}
    names = [f"{n[:POINT_MAX - 7]}-{_hash(json.dumps(p, sort_keys=True))}" if n in clash else n
             for n, p in zip(names, points)]
    assert len(set(names)) == len(names), names
    return names


# ---------------------------------------------------------------------------------------------------------------
# Secrets: never written into the record.

def redact(args: list[str]) -> list[str]:
    """`args` with the value of every key that holds a secret, and every secret from the environment, replaced."""
    secrets = [os.environ[k] for k in _SECRET_ENV if len(os.environ.get(k, "")) >= 4]
    out = []
    for arg in args:
        key, eq, _ = arg.partition("=")
        if eq and _SECRET_KEY.search(re.split(r"[./]", _plain(key))[-1]):
            arg = f"{key}={REDACTED}"
        for secret in secrets:
            arg = arg.replace(secret, REDACTED)
        out.append(arg)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The record: <run.root>/<sweep>/sweep.json

def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def record_entry(point: Point, run_name: str, overrides: list[str]) -> dict:
    return {"run": run_name, "run_dir": point.name, "overrides": redact(overrides), "params": dict(point.params)}


def check_sweep_folder(folder: Path, name: str) -> None:
    """The sweep folder must not be a run directory (a run of that name exists)."""
    if (folder / "manifest.json").exists() or (folder / "config.yaml").exists():
        raise ConfigError("run.name", f"'{name}' is a run ({folder}), not a sweep: name the sweep with another "
                          "run.name")


def merge_record(folder: Path, name: str, command: list[str], params: dict[str, list[str]],
                 entries: list[dict]) -> tuple[dict, bool]:
    """The record to write and whether it changed. A rerun of the same command keeps the record as it is; a rerun
    that sweeps the same keys with new values adds its points (the others stay listed); one that sweeps other keys
    is refused (the point names would not compare)."""
    check_sweep_folder(folder, name)
    path = folder / RECORD
    if not path.is_file():
        return {"sweep": name, "created": _now(), "command": redact(command), "params": params,
                "points": entries}, True
    try:
        old = json.loads(path.read_text())
        old_points = {p["run"]: p for p in old["points"]}
        old_params = dict(old["params"])
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(str(path), f"unreadable sweep record ({e}): move it away to start the sweep anew") from None
    if list(old_params) != list(params):
        raise ConfigError("overrides", f"sweep '{name}' sweeps {', '.join(old_params) or 'nothing'}; this command "
                          f"sweeps {', '.join(params)}: use another run.name for another sweep")
    new = [e for e in entries if e["run"] not in old_points]
    if not new:
        return old, False
    merged = dict(old)
    merged["params"] = {k: old_params[k] + [v for v in params[k] if v not in old_params[k]] for k in params}
    merged["points"] = [*old["points"], *new]
    merged.setdefault("added", []).append({"time": _now(), "command": redact(command),
                                           "points": [e["run"] for e in new]})
    return merged, True


def write_record(folder: Path, record: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / RECORD, record)
    return folder / RECORD
