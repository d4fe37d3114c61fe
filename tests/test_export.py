"""The evaluation export of a trainer=megatron checkpoint (train/export.py) runs where megatron-core is absent: its
TP shards are reassembled by pure tensor work. The export runs in a fresh interpreter in which `import megatron`
fails, as on an evaluation node without the megatron extra (the test environment has megatron-core installed, so
only blocking it shows an import that sneaked in). tests/test_megatron_trainer.py does the same on checkpoints the
megatron trainer wrote; the one here is written by hand in the trainer's layout, so this test needs no megatron."""
import json
import os
import subprocess
import sys

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from oel_hpc.rundir import RunPaths
from tests.conftest import ROOT, compose

TINY = ROOT / "oel_hpc" / "assets" / "tiny-qwen3"

# the export, with every `import megatron...` refused (None in sys.modules makes the import raise ImportError)
_EXPORT_WITHOUT_MEGATRON = """
import sys
sys.modules["megatron"] = None
from pathlib import Path
from omegaconf import OmegaConf
from oel_hpc.rundir import RunPaths
from oel_hpc.train.export import export_for_eval
paths = RunPaths(Path(sys.argv[1]))
print(export_for_eval(OmegaConf.load(paths.config), paths, 1, int(sys.argv[2])))
assert not any(name.startswith("megatron.") for name in sys.modules), "a megatron module was imported"
"""


def export_without_megatron(run: os.PathLike, step: int):
    """Run the evaluation export of `run`'s round-1 checkpoint `step` with megatron blocked; the exported folder."""
    out = subprocess.run([sys.executable, "-c", _EXPORT_WITHOUT_MEGATRON, str(run), str(step)], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1"), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_blocking_megatron_makes_its_import_fail():
    code = "import sys; sys.modules['megatron'] = None\ntry:\n import megatron.core\nexcept ImportError:\n print('blocked')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "blocked", out.stdout + out.stderr


def test_megatron_checkpoint_exports_without_megatron(tmp_path):
    """A tp=2 checkpoint in the megatron trainer's layout (each TP rank's model under `tp<r>_of_2`), holding
    weights that differ from the base model's: the export must give those weights, not the base model's."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoConfig, AutoModelForCausalLM

    from oel_hpc.train.megatron.convert import hf_to_megatron, shard_key

    cfg = compose([f"run.root={tmp_path}", f"model.path={TINY}", "trainer=megatron", "trainer.tp=2"])
    run = tmp_path / "run"
    paths = RunPaths(run)
    paths.config.parent.mkdir(parents=True)
    OmegaConf.save(cfg, paths.config)
    hf_config = AutoConfig.from_pretrained(TINY)
    base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32).state_dict()
    g = torch.Generator().manual_seed(0)
    trained = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()}  # "trained" weights
    state = {shard_key(r, 2): {"model": hf_to_megatron(trained, hf_config, tp_rank=r, tp_size=2)} for r in range(2)}
    ckpt = paths.ckpt(1, 3)
    ckpt.mkdir(parents=True)
    dcp.save(state, checkpoint_id=ckpt, no_dist=True)
    (ckpt / "meta.json").write_text(json.dumps({"step": 3, "config_hash": "h", "world_size": 2,
                                                "trainer": "megatron", "tp": 2, "optimizer": "adamw"}))

    out = export_without_megatron(run, 3)
    assert out.endswith("round_1/consolidate/ckpt/step_3/hf")
    exported = load_file(ckpt / "hf" / "model.safetensors")
    names = set(trained) - ({"lm_head.weight"} if hf_config.tie_word_embeddings else set())
    assert set(exported) == names
    for name in names:
        assert torch.equal(exported[name], trained[name].to(exported[name].dtype)), name
        assert not torch.equal(exported[name], base[name].to(exported[name].dtype)), name
