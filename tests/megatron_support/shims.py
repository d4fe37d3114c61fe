"""CPU shims that let megatron-core 0.16.1 build and run a GPTModel on a machine without CUDA. TESTS ONLY.

Nothing here belongs in the package: on a GPU none of it is needed, and each patch changes global state of
torch or megatron for the whole process.

    from tests.megatron_support import shims; shims.install()

or, for subprocesses and Slurm jobs, ``PYTHONPATH=tests/megatron_support OEL_MEGATRON_CPU_SHIMS=1`` (the
``sitecustomize`` beside this file then calls ``install()`` at interpreter start). Model code must also use
``use_cpu_initialization=True``, fusions off and dropout 0 (``oel_hpc.train.megatron.model.transformer_config(cpu=True)``
does), and must not call ``model_parallel_cuda_manual_seed`` (it seeds CUDA generators).

The shims, each with why it is needed:

1. ``torch.cuda.current_device`` -> ``torch.device("cpu")``: megatron passes it as ``device=`` in ~20 places
   (rotary embedding, tensor-parallel linears and embeddings, the global memory buffer); a CPU build raises.
2. megatron's CUDA RNG tracker -> a no-op tracker: weight init and attention dropout ``fork()`` CUDA generator
   states, which do not exist on CPU.
3. ``fused_softmax.get_default_causal_mask`` -> a CPU mask: the stock local attention builds its causal mask with a
   hard-coded ``device="cuda"``.

Patches 2 and 3 apply when megatron's module is imported (an import hook), or at once if it already is.
``install()`` is idempotent; ``uninstall()`` undoes it (for a test fixture's teardown).
"""
from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys

_RANDOM = "megatron.core.tensor_parallel.random"
_SOFTMAX = "megatron.core.fusions.fused_softmax"
_state: dict = {}


def _cpu_current_device():
    # megatron passes `device=torch.cuda.current_device()` in ~20 places (rotary embedding, tensor-parallel
    # linears/embeddings, the global memory buffer); on a CPU build that raises, so answer "the CPU".
    import torch

    return torch.device("cpu")


def _make_tracker(random_mod):
    class CpuRNGStatesTracker(random_mod.CudaRNGStatesTracker):
        """No-op stand-in for megatron's CUDA RNG tracker: `add` only books the name/seed (the stock one reads and
        writes CUDA generator state), `fork` is a null context (the stock one swaps CUDA RNG states around dropout,
        which is 0 in our CPU tests anyway)."""

        def add(self, name, seed):
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = None

        @contextlib.contextmanager
        def fork(self, name=random_mod._MODEL_PARALLEL_RNG_TRACKER_NAME):
            yield

    return CpuRNGStatesTracker


def _patch_random(random_mod) -> None:
    # `get_cuda_rng_tracker()` reads this module global; making it initialised with the no-op tracker means the
    # tracker is never built from CUDA state. The default name is pre-added so a `fork()` lookup never fails.
    if getattr(random_mod, "_oel_cpu_shim", False):
        return
    tracker = _make_tracker(random_mod)()
    tracker.add(random_mod._MODEL_PARALLEL_RNG_TRACKER_NAME, 0)
    _state["random"] = (random_mod._CUDA_RNG_STATE_TRACKER, random_mod._CUDA_RNG_STATE_TRACKER_INITIALIZED)
    random_mod._CUDA_RNG_STATE_TRACKER = tracker
    random_mod._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    random_mod._oel_cpu_shim = True


def _cpu_causal_mask(sq: int):
    import torch

    return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)


def _patch_softmax(softmax_mod) -> None:
    # megatron's stock (unfused) attention builds its default causal mask with a hard-coded device="cuda"
    # (transformer/utils.get_default_causal_mask, imported by name into fused_softmax): build it on the CPU.
    if getattr(softmax_mod, "_oel_cpu_shim", False):
        return
    _state["softmax"] = softmax_mod.get_default_causal_mask
    softmax_mod.get_default_causal_mask = _cpu_causal_mask
    softmax_mod._oel_cpu_shim = True


_PATCHES = {_RANDOM: _patch_random, _SOFTMAX: _patch_softmax}


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Applies the megatron patches right after each patched module is first imported (sitecustomize runs before
    megatron is imported, and importing megatron there would cost every interpreter ~5 s)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PATCHES:
            return None
        sys.meta_path.remove(self)  # find the real spec without ourselves, then wrap its loader
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        real_exec = spec.loader.exec_module

        def exec_module(module):
            real_exec(module)
            _PATCHES[fullname](module)

        spec.loader.exec_module = exec_module
        return spec


_finder = _PatchOnImport()


def install() -> None:
    """Apply the CPU shims (idempotent)."""
    import torch

    if "current_device" not in _state:
        _state["current_device"] = torch.cuda.current_device
        torch.cuda.current_device = _cpu_current_device
    pending = False
    for name, patch in _PATCHES.items():
        if name in sys.modules:
            patch(sys.modules[name])
        else:
            pending = True
    if pending and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def uninstall() -> None:
    """Undo `install()` (the no-op RNG tracker is swapped back for whatever megatron had before)."""
    import torch

    if _finder in sys.meta_path:
        sys.meta_path.remove(_finder)
    if "current_device" in _state:
        torch.cuda.current_device = _state.pop("current_device")
    random_mod = sys.modules.get(_RANDOM)
    if random_mod is not None and getattr(random_mod, "_oel_cpu_shim", False):
        tracker, initialised = _state.pop("random", (None, False))
        random_mod._CUDA_RNG_STATE_TRACKER = tracker
        random_mod._CUDA_RNG_STATE_TRACKER_INITIALIZED = initialised
        random_mod._oel_cpu_shim = False
    softmax_mod = sys.modules.get(_SOFTMAX)
    if softmax_mod is not None and getattr(softmax_mod, "_oel_cpu_shim", False):
        softmax_mod.get_default_causal_mask = _state.pop("softmax")
        softmax_mod._oel_cpu_shim = False
