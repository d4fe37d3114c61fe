"""The DAG: dependencies, hashes that follow the config, and what a rerun would do."""
import json

import pytest

from oel_hpc.pipeline import StageConflict, build_dag, model_path, plan
from oel_hpc.rundir import RunPaths, mark_done
from tests.conftest import compose


def dag(*overrides):
    return {n.id: n for n in build_dag(compose(list(overrides)))}


def test_two_rounds_chain_through_the_exported_model(tmp_path):
    nodes = dag("pipeline.rounds=2")
    assert list(nodes) == ["r1/extract", "r1/gather", "r1/deploy", "r1/consolidate", "r1/evaluate",
                           "r2/extract", "r2/gather", "r2/deploy", "r2/consolidate", "r2/evaluate"]
    assert nodes["r1/consolidate"].deps == ["r1/gather", "r1/deploy"]
    assert nodes["r2/extract"].deps == ["r1/consolidate"] and nodes["r2/deploy"].deps == ["r1/consolidate"]
    assert nodes["r1/extract"].tasks == [0, 1] and nodes["r1/evaluate"].tasks == [0, 2]
    cfg = compose(["pipeline.rounds=2"])
    paths = RunPaths(tmp_path)
    assert model_path(cfg, paths, 2) == str(tmp_path / "round_1" / "consolidate" / "hf")


def test_hashes_change_exactly_downstream_of_a_change():
    base = dag("pipeline.rounds=2")
    lr = dag("pipeline.rounds=2", "consolidate.lr=1e-3")
    changed = {i for i in base if base[i].hash != lr[i].hash}
    assert changed == {"r1/consolidate", "r1/evaluate", "r2/extract", "r2/gather", "r2/deploy", "r2/consolidate",
                       "r2/evaluate"}
    games = dag("pipeline.rounds=2", "evaluate.games=8")
    assert {i for i in base if base[i].hash != games[i].hash} == {"r1/evaluate", "r2/evaluate"}
    assert dag("pipeline.rounds=2", "run.overwrite=true", "wandb.mode=disabled")["r2/evaluate"].hash == \
        base["r2/evaluate"].hash
    # adding a round leaves round 1 as it was
    assert dag()["r1/evaluate"].hash == base["r1/evaluate"].hash


def test_external_experience_replaces_extraction(tmp_path):
    (tmp_path / "a.txt").write_text("- lesson")
    (tmp_path / "list.txt").write_text("a.txt\n")
    nodes = dag(f"gather.source={tmp_path / 'list.txt'}")
    assert "r1/extract" not in nodes and nodes["r1/gather"].deps == []
    before = nodes["r1/gather"].hash
    (tmp_path / "a.txt").write_text("- other lesson")
    (tmp_path / "list.txt").write_text("a.txt\n# edited\n".replace("# edited\n", ""))
    assert dag(f"gather.source={tmp_path / 'list.txt'}")["r1/gather"].hash == before  # list text unchanged
    (tmp_path / "list.txt").write_text("./a.txt\n")
    assert dag(f"gather.source={tmp_path / 'list.txt'}")["r1/gather"].hash != before


def test_plan_skips_done_and_refuses_changed(tmp_path):
    paths = RunPaths(tmp_path)
    nodes = build_dag(compose())
    extract = nodes[0]
    out = paths.experience(1, 0, 3)
    out.parent.mkdir(parents=True)
    out.write_text("- x")
    mark_done(paths, paths.done(1, "extract", 0), extract.hash, [out])
    todo = dict((n.id, t) for n, t in plan(paths, nodes, overwrite=False))
    assert todo["r1/extract"] == [1] and todo["r1/gather"] == [None]
    mark_done(paths, paths.done(1, "extract", 1), "another-hash", [out])
    with pytest.raises(StageConflict, match=r"r1/extract \(seed 1\) already finished with a different config"):
        plan(paths, nodes, overwrite=False)
    todo = dict((n.id, t) for n, t in plan(paths, nodes, overwrite=True))
    assert todo["r1/extract"] == [1]


def test_a_done_marker_of_an_older_hash_scheme_is_named_as_such(tmp_path):
    """A DONE written before stage hashes covered exactly the keys a stage reads has no hash_scheme: the refusal
    says the run is older, not that the user changed the config."""
    paths = RunPaths(tmp_path)
    nodes = build_dag(compose())
    out = paths.experience(1, 0, 3)
    out.parent.mkdir(parents=True)
    out.write_text("- x")
    done = paths.done(1, "extract", 0)
    done.write_text(json.dumps({"config_hash": "hash-of-the-old-scheme", "finished_at": "2026-11-30T00:00:00+0000",
                                "outputs": {paths.rel(out): "0" * 64}}))
    with pytest.raises(StageConflict, match=r"r1/extract \(seed 0\) was made by an older oel_hpc"):
        plan(paths, nodes, overwrite=False)


@pytest.mark.parametrize("overrides", [[], ["experiment=frozenlake_qwen3_8b"], ["pipeline.rounds=3", "consolidate.lr=2e-4"]])
def test_hashes_survive_the_config_file(tmp_path, overrides):
    """Batch jobs rebuild the DAG from the run's config.yaml: they must find the same hashes as the submitter (the
    schema re-applied or not)."""
    from omegaconf import OmegaConf

    from oel_hpc.config import load_run_config

    cfg = compose(overrides)
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    expected = [(n.id, n.hash) for n in build_dag(cfg)]
    assert [(n.id, n.hash) for n in build_dag(load_run_config(tmp_path / "config.yaml"))] == expected
    assert [(n.id, n.hash) for n in build_dag(OmegaConf.load(tmp_path / "config.yaml"))] == expected
