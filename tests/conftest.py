import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def wait_until(predicate, what, timeout, poll=0.2):
    """Poll predicate() until it returns something truthy, which is returned; fail after timeout seconds."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}; last value: {value!r}")
        time.sleep(poll)


def compose(overrides=()):
    """The config `python -m oel_hpc <overrides>` would run with."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from oel_hpc.config import CONF_DIR, config_error

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra_compose(config_name="config", overrides=list(overrides))
        except Exception as e:  # a value the schema refuses: the ConfigError `python -m oel_hpc` reports
            refused = config_error(e)
            if refused is None:
                raise
            raise refused from None


@pytest.fixture
def cfg_factory():
    return compose


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory):
    """A small Qwen3 with random weights and a tokenizer trained here, offline: for plumbing tests that need a
    real model but not a useful one."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    out = tmp_path_factory.mktemp("random-qwen3")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["You are P on a small grid. Reach the goal: [up] [down] [left] [right]. P _ H G"] * 20,
                            trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=32, intermediate_size=128, max_position_embeddings=2048,
                         tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """A finished 2-step run of the real pipeline (the committed tiny model), for tests that redo its consolidation
    on a copy (tests/test_precision.py, tests/test_train_numerics.py)."""
    import subprocess

    root = tmp_path_factory.mktemp("small-run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled", HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, "-m", "oel_hpc", f"run.root={root}", "consolidate.steps=2",
                          "consolidate.save_freq=1", "evaluate.games=4", "wandb.mode=disabled"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return root / "tiny-frozenlake"
