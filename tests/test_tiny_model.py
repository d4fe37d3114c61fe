"""The committed tiny default model (oel_hpc/assets/tiny-qwen3, built by tools/build_tiny_model.py).

It must load offline like any Hugging Face folder, answer game turns with a bracketed action, answer the extractor
with parseable lessons, and play clearly better with experience in its prompt than without (the gap OEL's
consolidation distils). The games here are played with the project's own games and prompt builder and sampled as
the evaluate stage samples (T 0.7, top-p 0.8, top-k 20), with fixed seeds; the assertions are margins, not the
numbers this particular build happens to reach. The last test runs the builder itself for a couple of steps.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from omegaconf import OmegaConf  # noqa: E402

import oel_hpc  # noqa: E402
from oel_hpc.experience import append_capped, parse_items, render  # noqa: E402
from oel_hpc.games import heldout_seeds, make_game  # noqa: E402
from oel_hpc.engines.hf import HFEngine  # noqa: E402
from oel_hpc.prompts import Ending, PromptBuilder  # noqa: E402
from oel_hpc.rollout import play_games  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ASSET = Path(oel_hpc.__file__).resolve().parent / "assets" / "tiny-qwen3"
BUILDER = ROOT / "tools" / "build_tiny_model.py"
TEMPLATES = OmegaConf.load(ROOT / "conf" / "prompts" / "default.yaml")
MARKER = "- "
# The embedded default's budgets (conf/experiment/tiny.yaml): experience cap 256, 96 tokens per turn, 5 turns,
# 32 new tokens per game turn in evaluate/deploy, 48 in extract (game turns and the extractor's answer).
EXPERIENCE_CAP = 256
TURN_BUDGET = EXPERIENCE_CAP + 96 * 5
EXTRACTOR_BUDGET = TURN_BUDGET + 96 + 48 * 5  # + the ending's final block
N_GAMES = 64


def load_builder():
    spec = importlib.util.spec_from_file_location("build_tiny_model", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(2)
    tokenizer = transformers.AutoTokenizer.from_pretrained(ASSET)
    model = transformers.AutoModelForCausalLM.from_pretrained(ASSET).eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def pool_experience():
    builder = load_builder()
    assert all(item in builder.POOL_ITEMS for item in builder.EVAL_EXPERIENCE)
    return render(builder.EVAL_EXPERIENCE, MARKER)


def chat_ids(tokenizer, messages):
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              enable_thinking=False, return_dict=False))


def prompts(engine):
    return PromptBuilder(TEMPLATES, engine.count_chat_tokens, TURN_BUDGET, EXTRACTOR_BUDGET)


def sampling(max_new_tokens):  # as the evaluate stage samples
    return OmegaConf.create({"temperature": 0.7, "top_p": 0.8, "top_k": 20, "max_new_tokens": max_new_tokens})


@pytest.fixture(scope="module")
def engine(tiny):
    return HFEngine(*tiny)


@pytest.fixture(scope="module")
def played(engine, pool_experience):
    """Held-out games played by the pipeline's own rollout, without and with experience in the prompt."""
    seeds = heldout_seeds(N_GAMES)
    return {name: play_games(engine, prompts(engine), "frozenlake", seeds, max_turns=5, sampling=sampling(32),
                             sampling_seed=seed, experience=experience)
            for name, experience, seed in (("plain", None, 1000), ("experience", pool_experience, 2000))}


def pass_rate(games):
    return sum(g.success for g in games) / len(games)


# -- the folder ------------------------------------------------------------------------------------------------


def test_folder_is_a_small_offline_qwen3(tiny):
    model, tokenizer = tiny
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json"):
        assert (ASSET / name).is_file(), name
    assert sum(p.stat().st_size for p in ASSET.iterdir()) < 6_000_000
    cfg = model.config
    assert cfg.model_type == "qwen3" and type(model).__name__ == "Qwen3ForCausalLM"
    assert cfg.head_dim >= 32  # vLLM's CPU attention rejects smaller heads
    assert cfg.tie_word_embeddings
    assert cfg.max_position_embeddings >= EXTRACTOR_BUDGET + 48
    assert cfg.vocab_size == len(tokenizer) <= 2048
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == im_end
    assert model.generation_config.eos_token_id in (im_end, [im_end])
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id != im_end


def test_chat_template_round_trip(tiny):
    _, tokenizer = tiny
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Turn 1:\nP _ H\n_ _ _\nH _ G"},
                {"role": "assistant", "content": "I move [down]."}, {"role": "user", "content": "Again."}]
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTurn 1:\nP _ H\n_ _ _\nH _ G<|im_end|>\n"
            "<|im_start|>assistant\nI move [down].<|im_end|>\n<|im_start|>user\nAgain.<|im_end|>\n")
    assert tokenizer.apply_chat_template(messages, tokenize=False) == text
    for thinking in (True, False):  # Qwen3's flag is accepted and ignored
        assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                             enable_thinking=thinking) == text + "<|im_start|>assistant\n"
    ids = chat_ids(tokenizer, messages)
    assert tokenizer.decode(ids) == text + "<|im_start|>assistant\n"
    specials = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
    assert ids.count(specials[0]) == 5 and ids.count(specials[1]) == 4
    assert tokenizer.decode(ids, skip_special_tokens=True).count("<|") == 0


def test_prompts_fit_the_tiny_budgets(tiny, engine, pool_experience):
    """A full 5-call game log with a full 256-token experience fits the turn budget without dropping a block."""
    _, tokenizer = tiny
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    assert count("P _ H\n_ _ _\nH _ G") <= 11  # board rows are cheap
    builder = load_builder()
    items = append_capped([], builder.POOL_ITEMS * 3, MARKER, EXPERIENCE_CAP, count)
    experience = render(items, MARKER)
    assert EXPERIENCE_CAP - 20 < count(experience) <= EXPERIENCE_CAP
    game = make_game("frozenlake", 7, max_calls=5)
    for response in ("[up]", "no idea", "[right]", "[left]"):
        game.step(response)
    messages = prompts(engine).game_turn(game.log_blocks, game.action_words, experience)
    assert TEMPLATES.omitted_turns not in messages[-1]["content"]
    assert len(chat_ids(tokenizer, messages)) <= TURN_BUDGET
    turns = [(block, "I move [right].") for block in game.log_blocks[:5]]
    game.step("[down]")
    ending = Ending(game.success, game.end_reason, game.log_blocks[-1])
    messages = prompts(engine).extractor(turns, ending, experience, marker=MARKER)
    assert TEMPLATES.omitted_turns not in messages[-1]["content"]


# -- behaviour -------------------------------------------------------------------------------------------------


def test_game_turns_get_a_bracketed_action(played, engine):
    for condition, games in played.items():
        turns = [t for g in games for t in g.turns]
        valid = sum(t.valid for t in turns) / len(turns)
        finished = sum(t.response_token_ids[-1] in engine.eos_token_ids for t in turns) / len(turns)
        mean_tokens = sum(len(t.response_token_ids) for t in turns) / len(turns)
        assert valid >= 0.8, (condition, valid)
        assert finished >= 0.95, (condition, finished)  # short answers that end with EOS
        assert mean_tokens <= 16, (condition, mean_tokens)


def test_experience_in_the_prompt_helps(played):
    plain, with_exp = pass_rate(played["plain"]), pass_rate(played["experience"])
    assert with_exp >= 0.6, (plain, with_exp)
    assert with_exp - plain >= 0.3, (plain, with_exp)  # the gap consolidation distils


def test_extractor_writes_lessons(engine, played):
    builder = prompts(engine)
    previous = render(["Never move onto an H cell.", "Reaching G wins the game."], MARKER)
    batch = [engine.chat_ids(builder.extractor([(t.log_blocks[-1], t.response) for t in game.turns], game.ending,
                                               previous if i % 2 else None, marker=MARKER))
             for i, game in enumerate(played["plain"][:12])]
    answers = engine.generate(batch, sampling(48), seed=7)
    parsed = [parse_items(a.text, MARKER) for a in answers]
    assert sum(1 <= len(items) <= 3 for items in parsed) >= 0.9 * len(parsed), [a.text for a in answers]
    assert sum(a.finished for a in answers) >= 0.9 * len(answers)
    assert all(len(item) >= 10 for items in parsed for item in items)


# -- the builder -----------------------------------------------------------------------------------------------


def test_builder_runs_and_its_output_loads(tmp_path):
    out = tmp_path / "tiny"
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, str(BUILDER), "--out", str(out), "--steps", "2", "--batch-size", "8",
                    "--eval-games", "0"], check=True, cwd=ROOT, env=env, timeout=300)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.model_type == "qwen3" and model.config.vocab_size == len(tokenizer)
    engine = HFEngine(model, tokenizer)
    messages = prompts(engine).game_turn(make_game("frozenlake", 0).log_blocks, ("[up]", "[down]"))
    [answer] = engine.generate([engine.chat_ids(messages)], sampling(4), seed=0)
    assert 1 <= len(answer.token_ids) <= 4 and isinstance(answer.text, str)
