"""Every recipe composes and validates; bad input gets a one-line error naming the key, before any work starts."""
import json
import os
import subprocess
import sys

import pytest

from oel_hpc.config import CONF_DIR, ConfigError, validate
from tests.conftest import ROOT, compose

RECIPES = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_the_four_paper_recipes_exist():
    assert {"sokoban_qwen3_4b_instruct", "frozenlake_qwen3_1_7b", "frozenlake_qwen3_4b",
            "frozenlake_qwen3_8b"} <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_compose_and_validate(recipe):
    cfg = compose([f"experiment={recipe}"])
    validate(cfg, check_files=False)  # the Qwen3 weights are not on this machine
    assert cfg.experiment == recipe


def test_recipe_values_follow_the_paper():
    cfg = compose(["experiment=frozenlake_qwen3_1_7b"])
    assert (cfg.model.path, cfg.model.thinking) == ("Qwen/Qwen3-1.7B", True)
    assert (cfg.extract.steps, cfg.extract.use_step, cfg.extract.show_previous) == (30, 15, False)
    assert (cfg.experience.max_tokens, cfg.consolidate.steps, cfg.consolidate.lr, cfg.pipeline.rounds) == (2048, 20, 5e-6, 2)
    assert (cfg.extract.seeds, cfg.consolidate.topk, cfg.consolidate.save_freq, cfg.env.max_turns) == (10, 256, 2, 5)
    assert cfg.deploy.steps == 20 and cfg.deploy.games_per_step == 128 and cfg.evaluate.games == 128
    assert cfg.prompts.tokens_per_turn == 512 and cfg.extract.sampling.max_new_tokens == 1024
    assert (cfg.extract.sampling.top_p, cfg.extract.sampling.top_k) == (0.8, 20)
    assert (cfg.deploy.sampling.top_p, cfg.deploy.sampling.top_k, cfg.deploy.sampling.temperature) == (1.0, 0, 0.7)
    sokoban = compose(["experiment=sokoban_qwen3_4b_instruct"])
    assert (sokoban.env.name, sokoban.model.thinking, sokoban.pipeline.rounds) == ("sokoban", False, 3)


def test_cfg_job_prints_a_recipe():
    out = subprocess.run([sys.executable, "-m", "oel_hpc", "experiment=frozenlake_qwen3_8b", "--cfg", "job"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "path: Qwen/Qwen3-8B" in out.stdout and "steps: 100" in out.stdout


def test_default_config_validates_with_files():
    validate(compose())


@pytest.mark.parametrize("override,key", [
    ("consolidate.steps=0", "consolidate.steps"),
    ("extract.steps=-1", "extract.steps"),
    ("deploy.games_per_step=0", "deploy.games_per_step"),
    ("evaluate.games=0", "evaluate.games"),
    ("consolidate.topk=100000", "consolidate.topk"),
    ("model.path=/nonexistent/model", "model.path"),
    ("extract.use_step=9", "extract.use_step"),
    ("env.name=chess", "env.name"),
    ("run.name=../escape", "run.name"),
    ("evaluate.sampling.top_p=0", "evaluate.sampling.top_p"),
])
def test_validate_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        validate(compose([override]))
    assert e.value.key == key


def run_cli(tmp_path, *overrides):
    # this checkout's oel_hpc, whichever one the interpreter has installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "oel_hpc", f"run.root={tmp_path / 'runs'}", *overrides],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize("override,message", [
    ("env=chess", "oel_hpc: error: env: unknown env 'chess' (available: frozenlake, sokoban)"),
    ("model=gpt5", "oel_hpc: error: model: unknown model 'gpt5'"),
    ("experiment=nope", "oel_hpc: error: experiment: unknown experiment 'nope'"),
    ("model.path=/no/such/model", "oel_hpc: error: model.path: model folder '/no/such/model' does not exist"),
    ("consolidate.topk=999999", "oel_hpc: error: consolidate.topk: k=999999 is larger than the vocabulary"),
    ("consolidate.steps=0", "oel_hpc: error: consolidate.steps: must be in [1, 100000], got 0"),
    ("gather.source=/no/list.txt", "oel_hpc: error: gather.source: experience list /no/list.txt does not exist"),
])
def test_cli_bad_input_one_line_exit_2_nothing_started(tmp_path, override, message):
    out = run_cli(tmp_path, override)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), out.stderr
    assert not (tmp_path / "runs").exists()


def test_cli_empty_experience_list(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps([]))
    out = run_cli(tmp_path, f"gather.source={tmp_path / 'list.json'}")
    assert out.returncode == 2 and "gather.source: experience list" in out.stderr and "has no entries" in out.stderr
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "list.txt").write_text("empty.txt\n")
    out = run_cli(tmp_path, f"gather.source={tmp_path / 'list.txt'}")
    assert out.returncode == 2 and "every experience file listed" in out.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------ typed values


def test_choices_match_the_sets_the_code_knows():
    from oel_hpc.config import Generator, ParseStyle, SeedScheme
    from oel_hpc.experience import PARSE_STYLES
    from oel_hpc.games import GENERATORS, SEED_SCHEMES

    assert [g.value for g in Generator] == list(GENERATORS)
    assert [s.value for s in SeedScheme] == list(SEED_SCHEMES)
    assert [p.value for p in ParseStyle] == list(PARSE_STYLES)


def test_a_choice_reads_writes_and_hashes_as_its_plain_value():
    from omegaconf import OmegaConf

    from oel_hpc.config import Launcher, TrainerName

    cfg = compose(["cluster=local_slurm", "trainer=megatron"])
    assert isinstance(cfg.cluster.launcher, Launcher) and isinstance(cfg.trainer.name, TrainerName)
    assert cfg.cluster.launcher == "slurm" and f"{cfg.trainer.name}" == "megatron"
    assert str(cfg.trainer.dtype) == "float32"
    assert {"megatron": 1}[cfg.trainer.name] == 1
    assert "launcher: slurm\n" in OmegaConf.to_yaml(cfg)
    # stage and run hashes are json of the resolved config: the enums must give the bytes plain strings give
    assert json.dumps(OmegaConf.to_container(cfg, resolve=True), sort_keys=True) == json.dumps(
        OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), sort_keys=True)


@pytest.mark.parametrize("override,message", [
    ("trainer.device=gpu", "trainer.device: must be auto, cpu or cuda, got 'gpu'"),
    ("trainer.export_dtype=int8", "trainer.export_dtype: must be null, float32, bfloat16 or float16, got 'int8'"),
    ("experience.parse=bullets", "experience.parse: must be marker, marker_anywhere or list, got 'bullets'"),
    ("cluster.container_runtime=docker", "cluster.container_runtime: must be apptainer or pyxis, got 'docker'"),
    ("trainer.tp=two", "trainer.tp: Value 'two' of type 'str' could not be converted to Integer"),
])
@pytest.mark.parametrize("launcher", [[], ["cluster=local_slurm", "launch.render_only=true"]])
def test_cli_bad_typed_value_one_line_exit_2(tmp_path, override, message, launcher):
    out = run_cli(tmp_path, override, *launcher)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [f"oel_hpc: error: {message}"]
    assert not (tmp_path / "runs").exists()


def test_run_config_is_typed_again_when_a_job_reads_it(tmp_path):
    from omegaconf import OmegaConf

    from oel_hpc.config import Device, Dtype, load_run_config

    cfg = compose(["trainer.dtype=bfloat16", "consolidate.lr=2e-4"])
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    loaded = load_run_config(path)
    assert loaded.trainer.dtype is Dtype.bfloat16 and loaded.trainer.device is Device.auto
    assert loaded == OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    with pytest.raises(Exception, match="Value 'fast' of type 'str' could not be converted to Float"):
        loaded.consolidate.lr = "fast"  # typed: a plain OmegaConf.load would take it


def test_a_config_yaml_from_before_a_key_existed_loads_with_its_default(tmp_path):
    from omegaconf import OmegaConf

    from oel_hpc.config import load_run_config

    written = OmegaConf.to_container(compose(), resolve=True)
    del written["trainer"]["optimizer"], written["trainer"]["attention"], written["env"]["invalid_move_limit"]
    del written["consolidate"]["loss_impl"]
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(written))
    cfg = load_run_config(path)
    assert (cfg.trainer.optimizer, cfg.trainer.attention, cfg.env.invalid_move_limit, cfg.consolidate.loss_impl) == (
        "auto", "auto", None, "auto")


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["trainer"].update(warp_speed=9), "trainer.warp_speed: no such key in the config schema"),
    (lambda c: c["trainer"].update(device="tpu"), "trainer.device: must be auto, cpu or cuda, got 'tpu'"),
    (lambda c: c["extract"].update(steps="many"), "extract.steps: Value 'many' of type 'str' could not be converted"),
])
def test_a_bad_config_yaml_is_a_config_error_naming_the_file_and_key(tmp_path, edit, message):
    from omegaconf import OmegaConf

    from oel_hpc.config import load_run_config

    written = OmegaConf.to_container(compose(), resolve=True)
    edit(written)
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(written))
    with pytest.raises(ConfigError) as e:
        load_run_config(path)
    assert e.value.key == str(path) and str(e.value).startswith(f"{path}: {message}")
    assert "\n" not in str(e.value)
