"""A model folder's files, checked before anything runs: a Hugging Face folder whose config.json is empty, cut
short or not JSON, whose tokenizer is missing, or whose safetensors weights are truncated would otherwise fail
minutes later, in the middle of a stage, with a traceback that names no file. Torch-free and cheap: JSON files are
parsed, weights are only checked against the sizes their own headers declare.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from oel_hpc.errors import ConfigError

# One of these makes a tokenizer transformers can load (fast tokenizer, sentencepiece, or BPE vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_JSON_FILES = ("tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.json")
_MAX_HEADER = 100_000_000  # what safetensors itself accepts


def read_json(path: Path, key: str) -> Any:
    """A JSON file's value, or a one-line ConfigError naming the file."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text (a binary file?)") from None
    except OSError as e:
        raise ConfigError(key, f"{path} cannot be read: {e.strerror}") from None
    if not text.strip():
        raise ConfigError(key, f"{path} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(key, f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}; "
                          "cut short?)") from None


def check_model_dir(folder: Path, key: str = "model.path", local: bool = True) -> dict:
    """config.json of `folder` (parsed), after checking what loading it needs. A folder from the Hugging Face cache
    (`local=False`) may still fetch the files it lacks, so only the files present there are checked."""
    config = read_json(folder / "config.json", key)
    if not isinstance(config, dict):
        raise ConfigError(key, f"{folder / 'config.json'} must hold a JSON object, got {type(config).__name__}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type.strip():
        raise ConfigError(key, f"{folder / 'config.json'} has no model_type (transformers cannot tell the "
                          "architecture; is the file complete?)")
    for name in ("vocab_size", "max_position_embeddings"):
        value = config.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise ConfigError(key, f"{folder / 'config.json'}: {name} must be a positive integer, got {value!r}")
    for name in _JSON_FILES:
        if (folder / name).is_file():
            read_json(folder / name, key)
    has_tokenizer = any((folder / name).is_file() for name in TOKENIZER_FILES) or any(folder.glob("*.tiktoken"))
    if local and not has_tokenizer:
        raise ConfigError(key, f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    _check_weights(folder, key, every_shard=local)
    return config


def _check_weights(folder: Path, key: str, every_shard: bool) -> None:
    """Every safetensors file present is as long as its header says; with `every_shard`, every shard an index
    names is present."""
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.is_file():
        listed = read_json(index, key)
        weight_map = listed.get("weight_map") if isinstance(listed, dict) else None
        if not isinstance(weight_map, dict):
            raise ConfigError(key, f"{index} has no weight_map")
        for shard in sorted(set(weight_map.values())):
            if every_shard and not (folder / shard).is_file():
                raise ConfigError(key, f"{folder / shard} (named in {index.name}) does not exist")
    for path in files:
        _check_safetensors(path, key)


def _check_safetensors(path: Path, key: str) -> None:
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > _MAX_HEADER or 8 + n > size:
            raise ConfigError(key, f"{path} is not a complete safetensors file (header cut short or damaged)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConfigError(key, f"{path} has a damaged safetensors header") from None
    ends = [t["data_offsets"][1] for name, t in header.items()
            if name != "__metadata__" and isinstance(t, dict) and len(t.get("data_offsets") or ()) == 2]
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        raise ConfigError(key, f"{path} is cut short: {size} bytes, its header describes {expected}")
