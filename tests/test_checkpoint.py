"""Checkpoints you can trust (train/checkpoint.py), in one process on a small torch module: every file a save writes
is recorded with its size and sha256; resume verifies them, and a damaged checkpoint (bytes flipped, a file cut
short or missing, meta.json edited) is reported by name, moved aside, and the previous one is loaded; none left
starts afresh from the untouched weights. Temporary folders are unique per save, and only a dead writer's are
removed. tests/test_resume_exact.py does the same through real consolidation runs, killed and resumed."""
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from oel_hpc.errors import DamagedCheckpoint
from oel_hpc.rundir import this_host
from oel_hpc.train import checkpoint

HASH = "cafe"  # the stage's config hash


class SmallTrainer:
    """What checkpoint.py asks of a backend, over a two-layer module and AdamW (as the torch backend keeps them)."""

    name = "torch"

    def __init__(self):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.05)

    def train(self, steps: int) -> None:
        for _ in range(steps):
            x = torch.randn(5, 8)  # the global RNG: a resume must restore it to take the same draws
            self.model(x).square().mean().backward()
            self.optimizer.step()
            self.optimizer.zero_grad()

    def weights(self) -> dict:
        return {k: v.clone() for k, v in self.model.state_dict().items()}

    def checkpoint_state(self) -> dict:
        model, optim = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optimizer": optim}

    def load_checkpoint_state(self, state: dict) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])

    def checkpoint_meta(self) -> dict:
        return {"trainer": self.name}

    def check_checkpoint(self, meta, path) -> None:
        pass


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def saved(tmp_path):
    """Checkpoints at steps 1 and 2 of a small run, and the weights after each (and after step 3)."""
    ckpt, trainer, after = tmp_path / "ckpt", SmallTrainer(), {0: None}
    after[0] = trainer.weights()
    for step in (1, 2):
        trainer.train(1)
        checkpoint.save(ckpt, step, trainer, HASH)
        after[step] = trainer.weights()
    trainer.train(1)
    after[3] = trainer.weights()
    return ckpt, after


def resume(ckpt: Path) -> tuple[int, SmallTrainer]:
    trainer = SmallTrainer()
    return checkpoint.resume(ckpt, trainer, HASH), trainer


def test_meta_records_every_file_and_a_resume_continues_exactly(saved):
    ckpt, after = saved
    folder = ckpt / "step_2"
    meta = json.loads((folder / "meta.json").read_text())
    on_disk = {p.name for p in folder.iterdir()} - {"meta.json"}
    assert set(meta["files"]) == on_disk == {".metadata", "__0_0.distcp", "rng_rank0.pt"}
    for name, rec in meta["files"].items():
        data = (folder / name).read_bytes()
        assert rec == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".")]  # no temporary folder left behind

    step, trainer = resume(ckpt)
    assert step == 2 and same(trainer.weights(), after[2])
    trainer.train(1)  # optimizer state and RNG came back too: the next step is the uninterrupted one
    assert same(trainer.weights(), after[3])


def flip(path: Path, at: float = 0.5, n: int = 8) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i:i + n] = bytes(b ^ 0xFF for b in data[i:i + n])
    path.write_bytes(bytes(data))


def cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_meta(path: Path) -> None:
    meta = json.loads(path.read_text())
    meta["files"]["__0_0.distcp"]["size"] += 1  # a consistent-looking edit: only meta's own digest catches it
    path.write_text(json.dumps(meta))


DAMAGE = {
    "flipped shard bytes": ("__0_0.distcp", flip, "__0_0.distcp does not match its sha256"),
    "shard cut short": ("__0_0.distcp", cut, "__0_0.distcp has"),
    "metadata cut short": (".metadata", cut, ".metadata has"),
    "rng file missing": ("rng_rank0.pt", Path.unlink, "rng_rank0.pt: No such file"),
    "meta.json cut short": ("meta.json", cut, "meta.json cannot be read"),
    "meta.json edited": ("meta.json", edit_meta, "meta.json does not match its own checksum"),
    "meta.json missing": ("meta.json", Path.unlink, "meta.json is missing"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(saved, case, caplog):
    ckpt, after = saved
    name, damage, reason = DAMAGE[case]
    damage(ckpt / "step_2" / name)
    with caplog.at_level(logging.WARNING, logger="oel_hpc"):
        step, trainer = resume(ckpt)
    assert step == 1 and same(trainer.weights(), after[1])
    warning = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and f"{ckpt / 'step_2'} is damaged: {reason}" in warning[0], warning
    aside = [p.name for p in ckpt.iterdir() if p.name.startswith("damaged_step_2.")]
    assert len(aside) == 1 and aside[0] in warning[0]  # kept for inspection, out of the way of later saves
    assert checkpoint.steps(ckpt) == [1]


def test_no_checkpoint_left_starts_afresh_from_untouched_weights(saved, caplog):
    ckpt, after = saved
    flip(ckpt / "step_2/__0_0.distcp")
    cut(ckpt / "step_1/.metadata")
    with caplog.at_level(logging.WARNING, logger="oel_hpc"):
        step, trainer = resume(ckpt)
    assert step == 0 and same(trainer.weights(), after[0])  # the base weights: what an uninterrupted run starts from
    assert "passed its checks: training starts afresh" in caplog.text


def strip_checksums(folder: Path) -> None:
    """meta.json as versions before checksums wrote it."""
    meta = json.loads((folder / "meta.json").read_text())
    del meta["files"], meta["meta_sha256"]
    (folder / "meta.json").write_text(json.dumps(meta))


def test_a_load_that_raises_counts_as_damage(saved, caplog):
    """Without checksums (an older checkpoint) the damage shows only when loading: that is damage too."""
    ckpt, after = saved
    for folder in (ckpt / "step_1", ckpt / "step_2"):
        strip_checksums(folder)
    (ckpt / "step_2/rng_rank0.pt").write_bytes(b"not a pickle")
    with caplog.at_level(logging.WARNING, logger="oel_hpc"):
        step, trainer = resume(ckpt)
    assert step == 1 and same(trainer.weights(), after[1])
    assert f"{ckpt / 'step_2'} is damaged: rng_rank0.pt cannot be loaded" in caplog.text
    assert f"{ckpt / 'step_2'} carries no checksums (written by an older version)" in caplog.text

    cut(ckpt / "step_1/.metadata")  # read before anything is written into the model
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="oel_hpc"):
        step, trainer = resume(ckpt)
    assert step == 0 and same(trainer.weights(), after[0])
    assert f"{ckpt / 'step_1'} is damaged: .metadata cannot be loaded (UnpicklingError" in caplog.text


def test_a_load_that_fails_midway_with_nothing_older_stops(saved):
    """DCP loads in place: a shard that fails half-way may have written into the model. With no older checkpoint to
    load over it, starting "afresh" would start from mixed weights: refused, the file named; the damaged
    checkpoint is out of the way, so the same command then starts afresh."""
    ckpt, after = saved
    strip_checksums(ckpt / "step_2")
    cut(ckpt / "step_2/__0_0.distcp")
    cut(ckpt / "step_1/.metadata")
    with pytest.raises(DamagedCheckpoint, match=r"step_2: loading it failed"):
        resume(ckpt)
    step, trainer = resume(ckpt)
    assert step == 0 and same(trainer.weights(), after[0])


def test_another_config_is_refused_not_skipped(saved):
    ckpt, _ = saved
    with pytest.raises(RuntimeError, match="written under another config"):
        checkpoint.resume(ckpt, SmallTrainer(), "another")
    assert checkpoint.steps(ckpt) == [1, 2]  # nothing moved aside


def test_export_for_evaluation_refuses_a_damaged_checkpoint(saved):
    ckpt, _ = saved
    assert checkpoint.check_intact(ckpt / "step_2")["step"] == 2
    flip(ckpt / "step_2/__0_0.distcp")
    with pytest.raises(DamagedCheckpoint, match=r"step_2 is damaged: __0_0.distcp does not match"):
        checkpoint.check_intact(ckpt / "step_2")


# ---------------------------------------------------------------------------------------------------------------
# Temporary folders

def test_temporary_names_are_unique_and_only_dead_writers_are_cleaned(tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    names = {checkpoint._tmp_name(4) for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(f".step_4.{this_host()}.{os.getpid()}.") for n in names)

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    hour_ago = time.time() - checkpoint.STALE_TMP_AFTER_S - 60
    folders = {
        f".step_4.{this_host()}.{dead}.0badf00d.tmp": "removed",  # its writer is gone
        f".step_4.{this_host()}.{os.getppid()}.0badf00d.tmp": "kept",  # alive (our parent)
        ".step_4.othernode.1.0badf00d.tmp": "kept",  # another host, written recently: may be alive
        ".step_5.othernode.1.0badf00d.tmp": "removed",  # another host, silent for over an hour
        ".step_4.tmp": "removed",  # an older version's name, silent for over an hour
        ".step_6.tmp": "kept",  # an older version's name, written recently
        f".step_4.{this_host()}.{dead}.0badf00d.old": "removed",  # a dead publisher's old folder
        "step_4": "kept",
    }
    for name in folders:
        (ckpt / name).mkdir()
        (ckpt / name / "__0_0.distcp").write_bytes(b"x")
    for name in (".step_5.othernode.1.0badf00d.tmp", ".step_4.tmp"):
        for p in (ckpt / name, ckpt / name / "__0_0.distcp"):
            os.utime(p, (hour_ago, hour_ago))
    removed = checkpoint.remove_stale_tmp(ckpt)
    assert sorted(removed) == sorted(n for n, fate in folders.items() if fate == "removed")
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(n for n, fate in folders.items() if fate == "kept")


def test_two_writers_saving_the_same_step_do_not_break_each_other(tmp_path):
    """Before unique names both wrote through `.step_1.tmp` and one removed the other's. Two threads stand for two
    processes (the name holds the pid and a random part: threads differ by the random part; the run lock keeps a
    second process out, this is the layer below it)."""
    ckpt, trainer, failures = tmp_path / "ckpt", SmallTrainer(), []
    trainer.train(1)
    start = threading.Barrier(2)

    def writer():
        try:
            start.wait()
            for _ in range(15):
                checkpoint.save(ckpt, 1, trainer, HASH, keep=1)
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=writer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not failures, failures
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_1"]
    assert checkpoint.check_intact(ckpt / "step_1")["step"] == 1
