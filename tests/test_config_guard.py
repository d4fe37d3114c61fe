"""Bad input is refused before anything runs, in one line naming the key or file, exit status 2: every number
finite and in range, sizes bounded, run names that fit a folder, no key the schema lacks (on every path), model
folders and gather.source files that can be read."""
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from oel_hpc.config import ASSETS_DIR, RANGES, RUN_NAME_MAX, ConfigError, check_schema, load_run_config, \
    number_fields, validate
from oel_hpc.experience import read_source
from oel_hpc.model_files import check_model_dir
from tests.conftest import ROOT, compose

TINY = ASSETS_DIR / "tiny-qwen3"
NUMBERS = [(key.replace("<name>", "extract"), cls, name, kind) for key, cls, name, kind in number_fields()]
FLOAT_KEYS = [key for key, _, _, kind in NUMBERS if kind is float]
INT_KEYS = [(key, RANGES[cls, name]) for key, cls, name, kind in NUMBERS if kind is int]


def refused(overrides, key):
    """The ConfigError validate() raises for `overrides` (composition itself may refuse first)."""
    with pytest.raises(ConfigError) as e:
        validate(compose(overrides), check_files=False)
    assert e.value.key == key, str(e.value)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.fixture(scope="module")
def default_cfg():
    return compose()


def refused_value(cfg, key, value):
    """The ConfigError validate() raises once `key` is set to `value` (composing once: many keys are tried)."""
    cfg = cfg.copy()
    OmegaConf.update(cfg, key, value)
    with pytest.raises(ConfigError) as e:
        validate(cfg, check_files=False)
    assert e.value.key == key, str(e.value)
    return str(e.value)


# ------------------------------------------------------------------------------------------ numbers


def test_every_number_of_the_schema_has_a_range():
    missing = [key for key, cls, name, _ in number_fields() if (cls, name) not in RANGES]
    assert not missing, f"add a Range for {missing} to config.RANGES (and docs/configuration.md)"
    assert {"consolidate.lr", "consolidate.grad_clip", "deploy.sampling.temperature", "evaluate.sampling.top_p",
            "extract.extractor_sampling.temperature", "consolidate.sampling.top_p"} <= set(FLOAT_KEYS)


def test_every_range_is_documented():
    from oel_hpc.config import SamplingConfig

    docs = (ROOT / "docs" / "configuration.md").read_text()
    keys = {f"<stage>.sampling.{name}" if cls is SamplingConfig else key for key, cls, name, _ in number_fields()}
    assert not [k for k in keys if f"`{k}`" not in docs]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("key", FLOAT_KEYS)
def test_every_float_must_be_finite(default_cfg, key, value):
    message = refused_value(default_cfg, key, float(value))
    assert message == f"{key}: must be a finite number, got {float(value)}"


@pytest.mark.parametrize("key,allowed", INT_KEYS, ids=[k for k, _ in INT_KEYS])
def test_every_count_is_bounded_both_ways(default_cfg, key, allowed):
    message = refused_value(default_cfg, key, int(allowed.hi) + 1)
    assert message == f"{key}: must be in [{allowed.lo}, {allowed.hi}], got {int(allowed.hi) + 1}"
    refused_value(default_cfg, key, int(allowed.lo) - 1)


@pytest.mark.parametrize("override,key,message", [
    ("consolidate.lr=1e308", "consolidate.lr", "must be in (0, 1], got 1e+308"),
    ("consolidate.lr=0", "consolidate.lr", "must be in (0, 1], got 0.0"),
    ("consolidate.lr=1.5", "consolidate.lr", "must be in (0, 1]"),
    ("consolidate.temperature=0", "consolidate.temperature", "must be in [0.0001, 100], got 0.0"),
    ("consolidate.grad_clip=-1", "consolidate.grad_clip", "must be >= 0, got -1.0"),
    ("consolidate.weight_decay=2", "consolidate.weight_decay", "must be in [0, 1], got 2.0"),
    ("deploy.sampling.temperature=1e-9", "deploy.sampling.temperature",
     "must be 0 (greedy) or in [0.0001, 100], got 1e-09"),
    ("evaluate.sampling.temperature=1000", "evaluate.sampling.temperature", "must be 0 (greedy) or in"),
    ("extract.sampling.top_p=0", "extract.sampling.top_p", "must be in (0, 1], got 0.0"),
    ("consolidate.sampling.top_p=1.01", "consolidate.sampling.top_p", "must be in (0, 1]"),
    ("extract.seeds=100000000000", "extract.seeds", "must be in [1, 100000], got 100000000000"),
    ("evaluate.games=100001", "evaluate.games", "must be in [1, 100000]"),  # held-out seeds are < 100 000
    ("cluster.resources.consolidate.nodes=100000", "cluster.resources.consolidate.nodes", "must be in [1, 10000]"),
])
def test_out_of_range_values_name_the_key_and_the_range(override, key, message):
    assert refused([override], key).startswith(f"{key}: {message}")


@pytest.mark.parametrize("override", ["deploy.sampling.temperature=0", "consolidate.grad_clip=0",
                                      "consolidate.lr=1", "extract.sampling.top_p=1", "extract.eval_games=0",
                                      "consolidate.weight_decay=0", "consolidate.grad_clip=1e308",
                                      "extract.seeds=100000", "env.invalid_move_limit=null"])
def test_edge_values_that_mean_something_are_accepted(override):
    validate(compose([override]), check_files=False)


def test_a_value_taken_from_another_key_is_refused_under_that_key():
    refused(["consolidate.steps=0"], "consolidate.steps")  # deploy.steps is ${consolidate.steps}
    refused(["deploy.steps=${nope}"], "deploy.steps")


# ------------------------------------------------------------------------------------------ names and keys


def test_run_name_length_is_bounded():
    validate(compose([f"run.name={'a' * RUN_NAME_MAX}"]), check_files=False)
    assert "at most 100" in refused([f"run.name={'a' * (RUN_NAME_MAX + 1)}"], "run.name")


@pytest.mark.parametrize("override,message", [
    ("+train.kl_topk=0", "train: no such key in the config schema (did you mean trainer?)"),
    ("+consolidate.kl_topk=0", "consolidate.kl_topk: no such key in the config schema (did you mean "
                               "consolidate.topk?)"),
    ("++consolidate.lrr=1", "consolidate.lrr: no such key in the config schema (did you mean consolidate.lr?)"),
    ("+cluster.resources.extract.gpu=1", "cluster.resources.extract.gpu: no such key in the config schema"),
])
def test_a_key_added_with_plus_is_refused(override, message):
    with pytest.raises(ConfigError) as e:
        check_schema(compose([override]))
    assert str(e.value) == message


def test_a_hand_edited_config_yaml_is_refused_by_the_job(tmp_path):
    written = OmegaConf.to_container(compose(), resolve=True)
    written["consolidate"]["lr"] = float("nan")
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(written))
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    assert str(e.value) == f"{path}: consolidate.lr: must be a finite number, got nan"


# ------------------------------------------------------------------------------------------ the command line


def oel(tmp_path, *args, module="oel_hpc"):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("SLURM_CONF", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=180, env=env)


def assert_one_line_exit_2(out, message, tmp_path):
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [message], out.stderr
    assert not (tmp_path / "runs").exists()


SLURM = ["cluster=local_slurm", "launch.render_only=true"]


@pytest.mark.parametrize("args,message", [
    (["consolidate.lr=inf"], "consolidate.lr: must be a finite number, got inf"),
    (["deploy.sampling.temperature=nan"], "deploy.sampling.temperature: must be a finite number, got nan"),
    (["extract.seeds=100000000000"], "extract.seeds: must be in [1, 100000], got 100000000000"),
    ([f"run.name={'r' * 300}"], "run.name: 300 characters; at most 100 (it names a folder)"),
    (["+train.kl_topk=0"], "train: no such key in the config schema (did you mean trainer?)"),
    (["train.kl_topk=0"], "train: no such key in the config schema (did you mean trainer?)"),
    (["~consolidate.lr"], "consolidate.lr: a key of the schema cannot be deleted (~); give it a value"),
    (["-m", "+consolidate.kl_topk=0"], "consolidate.kl_topk: no such key in the config schema (did you mean "
                                       "consolidate.topk?)"),
    (["-m", "hydra/launcher=submitit_slurm", "launch.render_only=true", "+consolidate.lrr=1"],
     "consolidate.lrr: no such key in the config schema (did you mean consolidate.lr?)"),
    ([*SLURM, "consolidate.lrr=1"], "consolidate.lrr: no such key in the config schema (did you mean consolidate.lr?)"),
    ([*SLURM, "consolidate.grad_clip=nan"], "consolidate.grad_clip: must be a finite number, got nan"),
])
def test_cli_refuses_in_one_line_on_every_path(tmp_path, args, message):
    out = oel(tmp_path, f"run.root={tmp_path / 'runs'}", *args)
    assert_one_line_exit_2(out, f"oel_hpc: error: {message}", tmp_path)


def test_cli_an_override_hydra_cannot_parse_is_one_line(tmp_path):
    out = oel(tmp_path, f"run.root={tmp_path / 'runs'}", "+consolidate.lr=1")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "overrides: Could not append to config. An item is already at 'consolidate.lr'" in out.stderr


def test_worker_refuses_a_config_yaml_with_an_unknown_key(tmp_path):
    written = OmegaConf.to_container(compose(), resolve=True)
    written["consolidate"]["kl_topk"] = 0
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(written))
    out = oel(tmp_path, str(run), "r1/gather", module="oel_hpc.worker")
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"oel_hpc.worker: error: {run / 'config.yaml'}: consolidate.kl_topk: no such key in the config schema (did you mean consolidate.topk?)"]
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]


# ------------------------------------------------------------------------------------------ the model folder


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    return folder


def _cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("damage,message", [
    (lambda m: (m / "config.json").write_text("{}"), "config.json has no model_type"),
    (lambda m: (m / "config.json").write_text(""), "config.json is empty"),
    (lambda m: _cut(m / "config.json", 100), "config.json is not valid JSON"),
    (lambda m: (m / "config.json").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe"), "config.json is not UTF-8 text"),
    (lambda m: (m / "config.json").write_text("[1, 2]"), "config.json must hold a JSON object, got list"),
    (lambda m: _cut(m / "tokenizer_config.json", 50), "tokenizer_config.json is not valid JSON"),
    (lambda m: (m / "tokenizer.json").unlink(), "has no tokenizer (none of tokenizer.json"),
    (lambda m: _cut(m / "model.safetensors", 100_000), "model.safetensors is cut short: 100000 bytes"),
    (lambda m: _cut(m / "model.safetensors", 4), "model.safetensors is not a complete safetensors file"),
])
def test_a_damaged_model_folder_is_named_in_one_line(model, damage, message):
    check_model_dir(model)  # whole: passes
    damage(model)
    with pytest.raises(ConfigError) as e:
        check_model_dir(model)
    assert e.value.key == "model.path" and message in str(e.value) and "\n" not in str(e.value)


def test_a_missing_shard_is_named(model):
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ConfigError, match="model-00002-of-00002.safetensors .*does not exist"):
        check_model_dir(model)


def test_a_hub_cache_folder_may_still_lack_files(model):
    """A hub id's cached snapshot fetches what it lacks at load time: only the files present are checked."""
    (model / "tokenizer.json").unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-2.safetensors"}}))
    check_model_dir(model, local=False)
    (model / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no model_type"):
        check_model_dir(model, local=False)


def test_safetensors_size_check_reads_the_real_header(model):
    """The size the header describes is the file's size exactly (no slack the check would miss)."""
    data = (model / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    ends = [t["data_offsets"][1] for k, t in json.loads(data[8:8 + n]).items() if k != "__metadata__"]
    assert 8 + n + max(ends) == len(data)
    _cut(model / "model.safetensors", len(data) - 1)
    with pytest.raises(ConfigError, match="cut short"):
        check_model_dir(model)


def test_cli_empty_model_config_is_refused_at_once(tmp_path, model):
    (model / "config.json").write_text("{}")
    out = oel(tmp_path, f"run.root={tmp_path / 'runs'}", f"model.path={model}")
    assert_one_line_exit_2(out, f"oel_hpc: error: model.path: {model / 'config.json'} has no model_type (transformers "
                           "cannot tell the architecture; is the file complete?)", tmp_path)


# ------------------------------------------------------------------------------------------ gather.source


def test_binary_gather_source_is_named(tmp_path):
    (tmp_path / "list.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError) as e:
        read_source(tmp_path / "list.bin")
    assert str(e.value) == f"gather.source: experience list {tmp_path / 'list.bin'} is not UTF-8 text (a binary file?)"


@pytest.mark.parametrize("files,listing,message", [
    ({"e.bin": b"\xff\xfe\x00binary"}, "e.bin\n", "experience file (listed in {list}) {dir}/e.bin is not UTF-8"),
    ({"e.txt": b"- a\x00b"}, "e.txt\n", "holds NUL bytes"),
    ({}, '[{"seed": 0, "step": 1, "path": "e.txt", "sha', "experience list {list} is not valid JSON"),
    ({}, '{"path": "e.txt"}', "must be a JSON list of objects with a \"path\""),
    ({}, "\x00\x01\x02", "holds NUL bytes"),
])
def test_bad_gather_source_content_is_one_line(tmp_path, files, listing, message):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "list").write_text(listing)
    with pytest.raises(ConfigError) as e:
        read_source(tmp_path / "list")
    expected = message.format(list=tmp_path / "list", dir=tmp_path)
    assert e.value.key == "gather.source" and expected in str(e.value) and "\n" not in str(e.value)


def test_gather_source_may_be_a_folder_only_by_mistake(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a list file"):
        read_source(tmp_path)


def test_gathers_own_list_is_read_from_its_run_directory(tmp_path):
    """A finished run's round_<r>/experience_list.json names files relative to the run directory (as gather
    writes them): given as gather.source, it finds them there, not under round_<r>/round_<r>/."""
    from oel_hpc.experience import ExperienceEntry, entry_dict, sha256_text
    from oel_hpc.rundir import RunPaths

    paths = RunPaths(tmp_path / "old-run")
    texts = ["- go down first", "- avoid the hole"]
    rows = []
    for seed, text in enumerate(texts):
        path = paths.experience(1, seed, 3)
        path.parent.mkdir(parents=True)
        path.write_text(text)
        rows.append(entry_dict(ExperienceEntry(seed, 3, paths.rel(path), sha256_text(text), 4)))
    paths.experience_list(1).write_text(json.dumps(rows))
    assert rows[0]["path"] == "round_1/extract/seed_0/experience_3.txt"  # relative to the run directory
    got = read_source(paths.experience_list(1))
    assert [t for _, t in got] == texts
    assert [p for p, _ in got] == [paths.experience(1, s, 3) for s in (0, 1)]
    validate(compose([f"gather.source={paths.experience_list(1)}"]), check_files=False)


def test_a_list_elsewhere_is_read_from_its_own_folder(tmp_path):
    (tmp_path / "e.txt").write_text("- lesson")
    (tmp_path / "experience_list.json").write_text(json.dumps([{"path": "e.txt"}]))
    assert [t for _, t in read_source(tmp_path / "experience_list.json")] == ["- lesson"]


def test_cli_binary_gather_source(tmp_path):
    (tmp_path / "list.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe" * 100)
    out = oel(tmp_path, f"run.root={tmp_path / 'runs'}", f"gather.source={tmp_path / 'list.bin'}")
    assert_one_line_exit_2(out, f"oel_hpc: error: gather.source: experience list {tmp_path / 'list.bin'} is not "
                           "UTF-8 text (a binary file?)", tmp_path)

