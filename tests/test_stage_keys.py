"""Each stage's hash covers exactly the config keys it declares (pipeline.STAGE_KEYS), and it declares every key it
reads: the declaration is checked against the hashes key by key, and against the stages themselves by running a
tiny round with every undeclared key blanked out of the config each stage sees."""
import copy
from enum import Enum

import pytest
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from oel_hpc.config import load_run_config
from oel_hpc.pipeline import STAGE_KEYS, STAGES, UNHASHED_KEYS, build_dag
from tests.conftest import compose

MODEL_HASH_KEYS = ("model.path", "model.dtype", "model.thinking")  # the round-1 model hash, in every stage's hash
# gather.source swaps extraction out of the DAG for a file's content (tests/test_pipeline.py covers its hash)
NOT_PERTURBED = ("gather.source",)


def as_a_job_reads_it(cfg: DictConfig, tmp_path) -> DictConfig:
    """The config as a job finds it: resolved into config.yaml, read back with the schema."""
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return load_run_config(path)


def leaves(node: DictConfig, prefix: str = ""):
    """Every key that holds a value (a list counts as one value), dotted."""
    for key in node:
        full = f"{prefix}{key}"
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            yield from leaves(child, f"{full}.")
        else:
            yield full


def under(keys, key: str) -> bool:
    return any(key == k or key.startswith(f"{k}.") for k in keys)


def another_value(cfg: DictConfig, key: str):
    """A copy of cfg with `key` set to another value its type accepts; None for a one-member enum (engine.name)."""
    value = OmegaConf.select(cfg, key)
    if isinstance(value, Enum):
        candidates = [m for m in type(value) if m != value]
        if not candidates:
            return None
    elif isinstance(value, bool):
        candidates = [not value]
    elif isinstance(value, (int, float)):
        candidates = [value + 1]
    elif isinstance(value, str):
        candidates = [value + " (changed)"]
    elif OmegaConf.is_list(value):
        candidates = [[*value, "changed"]]
    else:  # null: an int, a string or a dtype, whichever the key's type takes
        candidates = [3, "bfloat16"]
    changed = copy.deepcopy(cfg)
    for candidate in candidates:
        try:
            OmegaConf.update(changed, key, candidate, merge=False)
            return changed
        except Exception:  # noqa: BLE001 - not of the key's type: try the next
            continue
    raise AssertionError(f"no other value for {key} = {value!r}")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return as_a_job_reads_it(compose(), tmp_path_factory.mktemp("cfg"))


def upstream_of(nodes) -> dict[str, set[str]]:
    by_id = {n.id: n for n in nodes}

    def walk(node_id):
        deps = set(by_id[node_id].deps)
        return deps.union(*(walk(d) for d in deps)) if deps else set()

    return {by_id[i].stage: {by_id[d].stage for d in walk(i)} for i in by_id}


def test_every_declared_key_exists(base):
    for stage, keys in STAGE_KEYS.items():
        for key in keys:
            assert OmegaConf.select(base, key, default=KeyError) is not KeyError, f"{stage} declares unknown {key}"
    for key in UNHASHED_KEYS:
        assert OmegaConf.select(base, key, default=KeyError) is not KeyError, key


def test_every_key_is_read_by_some_stage_or_left_out_on_purpose(base):
    """A new config key must be declared by the stages that read it, or listed in UNHASHED_KEYS with its reason."""
    declared = [k for keys in STAGE_KEYS.values() for k in keys] + list(UNHASHED_KEYS)
    assert [key for key in leaves(base) if not under(declared, key)] == []


def test_a_stage_hash_changes_with_exactly_the_keys_it_and_its_upstream_declare(base):
    """Changing a key a stage declares (or one of its upstream stages declares, or the model) changes its hash;
    changing any other key leaves it alone."""
    nodes = build_dag(base)
    before = {n.stage: n.hash for n in nodes}
    upstream = upstream_of(nodes)
    keys = [k for k in leaves(base) if k not in NOT_PERTURBED]
    assert len(keys) > 100 and "experience.max_tokens" in keys
    wrong = []
    for key in keys:
        changed = another_value(base, key)
        if changed is None:
            continue
        after = {n.stage: n.hash for n in build_dag(changed) if n.round == 1}
        for stage in STAGES:
            expected = key in MODEL_HASH_KEYS or under(STAGE_KEYS[stage], key) or any(
                under(STAGE_KEYS[up], key) for up in upstream[stage])
            if (after[stage] != before[stage]) != expected:
                wrong.append(f"{key} {'does not change' if expected else 'changes'} r1/{stage}")
    assert wrong == []


@pytest.mark.parametrize("key,stages", [
    ("experience.max_tokens", {"extract", "deploy", "consolidate", "evaluate"}),
    ("extract.sampling.max_new_tokens", {"extract", "deploy", "consolidate", "evaluate"}),
    ("trainer.export_dtype", {"consolidate", "evaluate"}),
    ("trainer.device", {"extract", "deploy", "consolidate", "evaluate"}),
    ("trainer.parallel", {"consolidate"}),
    ("engine.max_batch", {"extract", "deploy", "consolidate", "evaluate"}),
    ("engine.name", {"extract", "deploy", "consolidate", "evaluate"}),  # consolidation samples with it (engine=vllm)
    ("engine.vllm.max_num_batched_tokens", {"extract", "deploy", "consolidate", "evaluate"}),
    ("extract.use_step", {"gather"}),
    ("env.generator", {"extract", "deploy", "evaluate"}),
    ("evaluate.games", {"evaluate"}),
])
def test_keys_read_through_helpers_are_declared(key, stages):
    """The keys a stage reads through the prompt builder, the engine or a checkpoint export, by name."""
    assert {s for s, keys in STAGE_KEYS.items() if under(keys, key)} == stages


# ------------------------------------------------------------------------------------ the stages themselves

TINY_ROUND = ["extract.seeds=1", "extract.steps=1", "extract.use_step=1", "extract.eval_games=1",
              "deploy.games_per_step=2", "consolidate.steps=2", "consolidate.save_freq=1", "evaluate.steps=all",
              "evaluate.games=2", "wandb.mode=disabled"]


class Undeclared(Exception):
    pass


def _undeclared(stage: str, key: str):
    raise Undeclared(f"{stage} read {key}, which pipeline.STAGE_KEYS['{stage}'] does not declare")


def restricted(cfg: DictConfig, stage: str) -> DictConfig:
    """cfg with every key the stage neither declares nor reads on purpose unhashed replaced by an interpolation that
    raises when resolved: reading one fails, naming it, however it is read (attribute, [], .get(), select,
    to_container(resolve=True))."""
    if not OmegaConf.has_resolver("undeclared"):
        OmegaConf.register_new_resolver("undeclared", _undeclared)
    keep = STAGE_KEYS[stage] + UNHASHED_KEYS
    out = copy.deepcopy(cfg)
    for key in list(leaves(out)):
        if not under(keep, key):
            OmegaConf.update(out, key, f"${{undeclared:{stage},{key}}}", merge=False)
    return out


def test_the_restriction_bites(base):
    cfg = restricted(base, "gather")
    for read in (lambda: cfg.env.max_turns, lambda: cfg.trainer.get("master_dtype"),
                 lambda: OmegaConf.select(cfg, "consolidate.sampling.top_k"),
                 lambda: OmegaConf.to_container(cfg.prompts, resolve=True), lambda: cfg.extract["steps"]):
        with pytest.raises(InterpolationResolutionError, match="gather read .* does not declare"):
            read()
    assert cfg.extract.use_step == base.extract.use_step and cfg.model.path == base.model.path
    assert cfg.cluster == base.cluster


def test_each_stage_runs_on_its_declared_keys_alone(tmp_path):
    """One tiny round (the committed tiny model), every stage given a config holding only its declared keys and
    UNHASHED_KEYS: a stage (or anything it calls) reading another key fails here, naming the key."""
    from oel_hpc.rundir import RunPaths
    from oel_hpc.stages import run_task
    from oel_hpc.stages.common import StageContext

    cfg = as_a_job_reads_it(compose([f"run.root={tmp_path}", *TINY_ROUND]), tmp_path)
    paths = RunPaths(tmp_path / cfg.run.name)
    nodes = build_dag(cfg)
    hashes = {n.id: n.hash for n in nodes}
    for node in nodes:
        ctx = StageContext(restricted(cfg, node.stage), paths, hashes)
        for task in node.task_ids():
            run_task(ctx, node.stage, node.round, task)
    assert (paths.root / "round_1/consolidate/hf/config.json").is_file()
    assert (paths.ckpt(1, 1) / "hf" / "config.json").is_file()  # step 1 was exported for its evaluation
    assert sorted(p.name for p in paths.eval_result(1, 0).parent.glob("step_*.json")) == [
        "step_0.json", "step_1.json", "step_2.json"]
