"""The trainer backend protocol (train/backend.py): it lists every member the consolidation loop and the checkpoint
code use on a backend, and both backends have each one, methods with the protocol's parameters. The torch backend is
also built for real (the committed tiny model, one process) and checked with isinstance."""
import ast
import inspect
import textwrap
from pathlib import Path

import pytest
import torch

from oel_hpc.train.backend import TrainerBackend
from oel_hpc.train.torch.trainer import TorchTrainer
from tests.conftest import ROOT, compose

TRAIN = ROOT / "oel_hpc" / "train"
TINY = ROOT / "oel_hpc" / "assets" / "tiny-qwen3"

DATA = sorted(TrainerBackend.__annotations__)
METHODS = sorted(name for name, value in vars(TrainerBackend).items()
                 if inspect.isfunction(value) and not name.startswith("_"))


def _megatron_trainer():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install 'oel_hpc[megatron]')")
    from oel_hpc.train.megatron.trainer import MegatronTrainer

    return MegatronTrainer


def _used_on_trainer(path: Path) -> set[str]:
    """The attributes read on a variable or attribute named `trainer` (`trainer.x`, `run.trainer.x`) in a file."""
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            owner = node.value
            name = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if name == "trainer":
                used.add(node.attr)
    return used


def _assigned_in_init(cls) -> set[str]:
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    return {t.attr for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
            for t in ast.walk(target)
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}


def test_the_protocol_lists_what_the_loop_and_the_checkpoints_use():
    used = _used_on_trainer(TRAIN / "consolidate.py") | _used_on_trainer(TRAIN / "checkpoint.py")
    used -= {"name", "tp", "parallel", "dtype"}  # cfg.trainer.<key>: config, not the backend
    assert used == set(DATA) | set(METHODS)
    assert len(used) == 19


@pytest.mark.parametrize("backend", ["torch", "megatron"])
def test_every_backend_has_every_member_with_the_protocols_parameters(backend):
    cls = TorchTrainer if backend == "torch" else _megatron_trainer()
    for name in METHODS:
        want = inspect.signature(getattr(TrainerBackend, name))
        got = inspect.signature(getattr(cls, name))
        assert [(p.name, p.kind) for p in got.parameters.values()] == \
            [(p.name, p.kind) for p in want.parameters.values()], f"{cls.__name__}.{name}{got} != {want}"
    missing = set(DATA) - _assigned_in_init(cls)
    assert not missing, f"{cls.__name__}.__init__ does not set {sorted(missing)}"


def test_a_signature_mismatch_would_be_seen():
    """The comparison above is not vacuous: a method with other parameters differs."""
    class Wrong(TorchTrainer):
        def optimizer_step(self, clip, extra=None):
            return 0.0, True

    want = [(p.name, p.kind) for p in inspect.signature(TrainerBackend.optimizer_step).parameters.values()]
    assert [(p.name, p.kind) for p in inspect.signature(Wrong.optimizer_step).parameters.values()] != want


def test_a_built_torch_backend_is_a_trainer_backend():
    from oel_hpc.train import distributed

    cfg = compose(["trainer.device=cpu"])
    d = distributed.Dist(distributed.DistEnv(), torch.device("cpu"), None)
    trainer = TorchTrainer(cfg, TINY, d, lr=1e-4, weight_decay=0.0)
    assert isinstance(trainer, TrainerBackend)
    assert (trainer.dp_rank, trainer.dp_size) == (0, 1) and trainer.vocab_size == trainer.student.config.vocab_size
    assert not isinstance(object(), TrainerBackend)
