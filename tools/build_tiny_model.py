#!/usr/bin/env python
"""Build the embedded default model of ``python -m oel_hpc``: oel_hpc/assets/tiny-qwen3/.

A ~0.9M-parameter Qwen3-architecture model with its own byte-level BPE tokenizer and a Qwen-style chat template,
pre-trained offline in under 3 minutes on 2 CPU cores on synthetic data rendered by the project's own code (the
Frozen Lake env, the BFS solver, ``PromptBuilder`` with ``conf/prompts/default.yaml``, ``experience.render``), so
the model is trained on exactly the prompts the pipeline shows it. What it learns:

1. a game turn is answered with a short sentence holding one bracketed action, e.g. ``I move [right].``;
2. the extractor prompt is answered with one or two lessons from a fixed pool (:data:`POOL`), one per line, each
   starting with the experience marker ``- `` (picked to fit what happened: a hole, the goal, edges, invalid moves,
   and preferring lessons not already listed as previous experience);
3. it **reacts to experience**: without an experience header it imitates a weak policy (the optimal move with
   p=0.25, else a uniformly random one, 5 % of answers without brackets); with any experience in its prompt it
   imitates the optimal move with p=0.9. That gap is what OEL's consolidation distils into the weights.

What makes a model this small learn the game in a few hundred steps (see ``loss_fn`` and ``SPLIT_PATTERN``):
every board row (``P _ H``) is one token; the action token is trained against the policy's whole move
distribution (a soft target) with extra weight; and the prompt tokens get a language-model loss too, so the model
learns to predict the next board of the game log, i.e. where P and the holes are.

Deterministic: fixed seeds, ``torch.set_num_threads(2)``, one tokenizer thread, no network; two builds on the same
machine and library versions give byte-identical files. At the end it prints the measured behaviour on held-out
games (pass and valid-action rates with and without a pool experience, the extractor's answers).

    python tools/build_tiny_model.py                       # rebuild the committed asset
    python tools/build_tiny_model.py --out /tmp/m --steps 2 --eval-games 0   # a quick smoke build
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the BPE trainer: one thread, same merges every time

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "oel_hpc" / "assets" / "tiny-qwen3"

MARKER = "- "
#: The embedded default's budgets (conf/experiment/tiny.yaml): experience cap, tokens per turn, turns, extractor
#: max_new_tokens. Every rendered prompt must fit them, so PromptBuilder never drops a block.
EXPERIENCE_TOKENS = 256
TURN_BUDGET = EXPERIENCE_TOKENS + 96 * 5
EXTRACTOR_BUDGET = TURN_BUDGET + 96 + 48 * 5  # + the ending's final block
MAX_NEW_TOKENS_TURN = 32
MAX_NEW_TOKENS_EXTRACT = 48

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

#: Our own general lessons for Frozen Lake 3x3, by the kind of event they help with.
POOL: dict[str, list[str]] = {
    "hole": [
        "H cells are holes; stepping on one ends the game.",
        "Never move onto an H cell.",
        "Look at the cell you move into; if it is H, pick another move.",
        "Falling into a hole loses the game at once.",
    ],
    "goal": [
        "G is the goal in the bottom-right corner; move right and down toward it.",
        "Reaching G wins the game.",
        "Moves toward G, right or down, are usually best.",
        "The shortest safe path to G takes four moves.",
    ],
    "edge": [
        "Moving off the edge wastes a turn.",
        "At the edge of the grid, a move outward does nothing.",
        "Do not move up or left from the top-left start.",
    ],
    "budget": [
        "Only five moves are allowed, so do not waste any.",
        "Moving away from G costs two moves to undo.",
        "Avoid going back and forth; every move counts.",
    ],
    "format": [
        "Always put the move in square brackets, like [right].",
        "Write exactly one move in brackets each turn.",
    ],
    "safe": [
        "_ cells are safe ice; walk on them freely.",
        "P marks where you stand.",
        "Plan a safe path around the holes before moving.",
        "If a hole blocks the direct way, go around it.",
        "When the cell to the right is a hole, move down first.",
        "When the cell below is a hole, move right first.",
    ],
}
POOL_ITEMS: list[str] = [item for items in POOL.values() for item in items]
#: The experience the builder's report (and the tests) put in the prompt: a few general lessons.
EVAL_EXPERIENCE: list[str] = [POOL["hole"][0], POOL["goal"][0], POOL["edge"][0], POOL["safe"][2]]

#: Game-turn answers: one bracketed action in a short sentence; the invalid ones forget the brackets.
#: The action sits at the same offset in every answer: the model decides it at a fixed distance from the board.
ANSWERS = ["I move [{a}].", "I go [{a}].", "I step [{a}].", "I move [{a}] now.", "I go [{a}] next."]
INVALID_ANSWERS = ["I move {a}.", "I am not sure.", "Let me go {a}.", "Maybe {a}?"]
ACTIONS = ("up", "down", "left", "right")

#: The policy the model imitates: P(optimal move) without / with experience in its prompt; otherwise a uniformly
#: random move, or (without experience only) an answer with no bracketed action.
P_OPTIMAL_PLAIN, P_OPTIMAL_EXPERIENCE, P_INVALID_PLAIN = 0.25, 0.9, 0.05
#: How often the earlier moves of a turn prompt come from the good policy, with / without experience.
HISTORY_GOOD_WITH, HISTORY_GOOD_PLAIN = 0.6, 0.2


# ---------------------------------------------------------------------------------------------------------------
# Synthetic data, rendered by the project's own game and prompt code


def prompt_builder(count_tokens=None):
    from omegaconf import OmegaConf

    from oel_hpc.prompts import PromptBuilder

    templates = OmegaConf.load(ROOT / "conf" / "prompts" / "default.yaml")
    # While the corpus is generated the tokenizer does not exist yet: budgets are checked after tokenization.
    count = count_tokens or (lambda messages: 0)
    return PromptBuilder(templates, count, TURN_BUDGET, EXTRACTOR_BUDGET)


def optimal(game) -> list[str]:
    from oel_hpc.games import optimal_actions

    return sorted(optimal_actions("frozenlake", game.state))


def policy(game, p_optimal: float) -> dict[str, float]:
    """The imitated policy's move distribution (given a bracketed answer): optimal with p_optimal, else uniform."""
    best = optimal(game)
    p_best = p_optimal if best else 0.0
    return {a: (1 - p_best) / len(ACTIONS) + (p_best / len(best) if a in best else 0.0) for a in ACTIONS}


def answer(rng: random.Random, game, p_optimal: float, p_invalid: float) -> tuple[str, dict[str, float] | None]:
    """One game-turn answer of the imitated policy, and the move distribution it was drawn from (None when the
    answer has no bracketed action)."""
    if rng.random() < p_invalid:
        return rng.choice(INVALID_ANSWERS).format(a=rng.choice(ACTIONS)), None
    dist = policy(game, p_optimal)
    move = rng.choices(ACTIONS, weights=[dist[a] for a in ACTIONS])[0]
    return rng.choice(ANSWERS).format(a=move), dist


def game_seed(rng: random.Random) -> int:
    from oel_hpc.games import train_seed

    # Train-style seeds and low (held-out-range) seeds alike: there are only 19 distinct maps.
    return train_seed("tiny-model", 0, 0, rng.randrange(10**6)) if rng.random() < 0.5 else rng.randrange(100_000)


def sample_experience(rng: random.Random, lo: int = 1, hi: int = 6) -> list[str]:
    n = rng.randint(lo, hi)
    items = rng.sample(POOL_ITEMS, min(n, len(POOL_ITEMS)))
    if rng.random() < 0.15:  # accumulated experience can repeat an item
        items.insert(rng.randrange(len(items) + 1), rng.choice(items))
    return items


def turn_example(rng: random.Random, builder) -> tuple[str, list[dict], str, dict[str, float] | None]:
    """A game-turn prompt after a random partial history (0-4 earlier calls), with or without experience."""
    from oel_hpc.experience import render
    from oel_hpc.games import make_game

    with_experience = rng.random() < 0.5
    # The earlier moves mostly come from the same policy (with experience: the good one), so the actions in the
    # game log are policy examples too (the prompt tokens are trained as well, see loss_fn).
    good = rng.random() < (HISTORY_GOOD_WITH if with_experience else HISTORY_GOOD_PLAIN)
    p_optimal, p_invalid = (P_OPTIMAL_EXPERIENCE, 0.0) if good else (P_OPTIMAL_PLAIN, P_INVALID_PLAIN)
    while True:
        game = make_game("frozenlake", game_seed(rng), max_calls=5)
        for _ in range(rng.randint(0, 4)):
            game.step(answer(rng, game, p_optimal, p_invalid)[0])
            if game.done:
                break
        if not game.done:
            break
    experience = render(sample_experience(rng), MARKER) if with_experience else None
    messages = builder.game_turn(game.log_blocks, game.action_words, experience)
    if experience:
        response, dist = answer(rng, game, P_OPTIMAL_EXPERIENCE, 0.0)
    else:
        response, dist = answer(rng, game, P_OPTIMAL_PLAIN, P_INVALID_PLAIN)
    return "turn", messages, response, dist


def lessons_for(rng: random.Random, game, previous: list[str]) -> list[str]:
    """1-2 pool items relevant to what happened in the game, preferring ones not written before."""
    from oel_hpc.games.frozen_lake import is_lost

    log = game.game_log
    if game.success:
        salient = ["goal", "safe"]
    elif is_lost(game.state):
        salient = ["hole", "safe"]
    else:
        salient = ["budget", "goal"]
    if "Invalid action." in log:
        salient.insert(rng.randrange(2), "format")
    if "You hit the edge" in log:
        salient.insert(rng.randrange(2), "edge")
    n = 1 if rng.random() < 0.4 else 2
    chosen: list[str] = []
    for category in salient + list(POOL):
        fresh = [i for i in POOL[category] if i not in previous and i not in chosen]
        if fresh and (category in salient or rng.random() < 0.3):
            chosen.append(rng.choice(fresh))
        if len(chosen) == n:
            break
    return chosen or [rng.choice(POOL_ITEMS)]


def extractor_example(rng: random.Random, builder) -> tuple[str, list[dict], str, None]:
    """An extractor prompt for a finished synthetic game, as oel_hpc/stages/extract.py renders it."""
    from oel_hpc.experience import render
    from oel_hpc.games import make_game
    from oel_hpc.prompts import Ending

    game = make_game("frozenlake", game_seed(rng), max_calls=5, text=builder.game_text)
    p_opt, p_inv = (P_OPTIMAL_PLAIN, P_INVALID_PLAIN) if rng.random() < 0.7 else (P_OPTIMAL_EXPERIENCE, 0.0)
    turns = []
    while not game.done:
        observation = game.log_blocks[-1]
        response, _ = answer(rng, game, p_opt, p_inv)
        game.step(response)
        turns.append((observation, response))
    previous = sample_experience(rng, 1, 6) if rng.random() < 0.5 else []
    ending = Ending(game.success, game.end_reason, game.log_blocks[-1])
    messages = builder.extractor(turns, ending, render(previous, MARKER) if previous else None, marker=MARKER)
    return "extractor", messages, render(lessons_for(rng, game, previous), MARKER), None


def make_examples(rng: random.Random, n: int, builder, p_extract: float = 0.12) -> list[tuple]:
    """(kind, chat messages, answer text, move distribution or None) for n examples, p_extract of them extractor
    answers."""
    return [extractor_example(rng, builder) if rng.random() < p_extract else turn_example(rng, builder)
            for _ in range(n)]


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer


def corpus_texts(examples) -> list[str]:
    texts = []
    for _, messages, response, _ in examples:
        texts.extend(m["content"] for m in messages)
        texts.append(response)
    texts.extend(POOL_ITEMS)
    texts.extend(a.format(a=w) for a in ANSWERS + INVALID_ANSWERS for w in ACTIONS)
    texts.extend(["user", "assistant", "system"] * 100)  # the chat roles become single tokens
    rows = [f"{a} {b} {c}" for a in "PHG_" for b in "PHG_" for c in "PHG_"]
    texts.extend(rows * 2)  # every possible board row is one token, even one the corpus lacks
    return texts


#: GPT-2's pre-tokenization, except that a whole Frozen Lake board row on its own line (``P _ H``) stays one piece,
#: so BPE learns one token per row: a board is 5 tokens (3 rows, 2 newlines) and the model reads a row at a glance.
SPLIT_PATTERN = (r"^[PHG_](?: [PHG_]){2}$"
                 r"|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], model_max_length=2048, chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False)
    return tokenizer


def chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def action_token_ids(tokenizer) -> list[int]:
    """The token of each action word right after an opening bracket (ACTIONS order)."""
    ids = []
    for word in ACTIONS:
        tokens = tokenizer.encode(f"[{word}]", add_special_tokens=False)
        if len(tokens) != 3:
            raise RuntimeError(f"[{word}] is not '[', one word token, ']' for this tokenizer: {tokens}")
        ids.append(tokens[1])
    return ids


def encode(tokenizer, examples) -> list[tuple[list[int], list[int], int, list[float] | None]]:
    """Per example: prompt ids, answer ids ending with <|im_end|>, the index of the action token in the answer
    (-1 if none) and the policy's move distribution there; checks the pipeline's budgets."""
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    moves = action_token_ids(tokenizer)
    out = []
    for kind, messages, response, dist in examples:
        prompt = chat_ids(tokenizer, messages)
        target = tokenizer.encode(response, add_special_tokens=False) + [eos]
        budget, new_tokens = ((EXTRACTOR_BUDGET, MAX_NEW_TOKENS_EXTRACT) if kind == "extractor"
                              else (TURN_BUDGET, MAX_NEW_TOKENS_TURN))
        if len(prompt) > budget or len(target) > new_tokens:
            raise RuntimeError(f"example over the tiny budgets: prompt {len(prompt)}/{budget}, "
                               f"answer {len(target)}/{new_tokens} tokens")
        at = -1
        if dist is not None:  # the action word right after the last opening bracket
            at = max(i for i, t in enumerate(target)
                     if t in moves and i > 0 and tokenizer.decode(target[i - 1:i]).endswith("["))
        out.append((prompt, target, at, None if dist is None else [dist[a] for a in ACTIONS]))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Model and training


def make_model(tokenizer, seed: int):
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        rms_norm_eps=1e-6, tie_word_embeddings=True, bos_token_id=None, eos_token_id=eos, pad_token_id=pad,
        use_cache=True)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=None, eos_token_id=eos, pad_token_id=pad, do_sample=True, temperature=0.7, top_p=0.8,
        top_k=20)
    return model


def batches(rng: random.Random, encoded, batch_size: int):
    """Batches of similar length (little padding), in random order."""
    order = list(range(len(encoded)))
    rng.shuffle(order)
    chunk = batch_size * 16
    out = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
        out.extend(part[j:j + batch_size] for j in range(0, len(part), batch_size))
    rng.shuffle(out)
    return out


def collate(encoded, idx, pad_id: int):
    """Right-padded ids, attention mask, answer-only labels, and the soft move targets: (row, position) of each
    action token's *prediction* and the move distribution it should match."""
    import torch

    rows = [encoded[i][0] + encoded[i][1] for i in idx]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    soft_rows, soft_pos, soft_dist = [], [], []
    for k, i in enumerate(idx):
        prompt, target, at, dist = encoded[i]
        n = len(prompt) + len(target)
        ids[k, :n] = torch.tensor(prompt + target)
        labels[k, len(prompt):n] = torch.tensor(target)
        mask[k, :n] = 1
        if at >= 0:
            soft_rows.append(k)
            soft_pos.append(len(prompt) + at - 1)  # the logits at t predict token t+1
            soft_dist.append(dist)
    soft = (torch.tensor(soft_rows, dtype=torch.long), torch.tensor(soft_pos, dtype=torch.long),
            torch.tensor(soft_dist, dtype=torch.float32).reshape(-1, len(ACTIONS)))
    return ids, mask, labels, soft


def loss_fn(logits, ids, mask, labels, soft, move_ids, move_weight: float, prompt_weight: float):
    """Mean cross-entropy on the answer tokens, where each action token's hard label is replaced by the policy's
    whole move distribution (a soft target without sampling noise) weighted by `move_weight`; plus
    `prompt_weight` × the plain language-model loss on the prompt tokens. Predicting the game log (the next board
    after a move) teaches the model where P and the holes are, which the policy needs: without it a model this
    small learns the game far more slowly."""
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    answer = (labels[:, 1:] != -100).float()
    prompt = mask[:, 1:].float() - answer
    rows, pos, dist = soft
    answer[rows, pos] = 0.0  # replaced by the soft term
    soft_ce = -(dist * logp[rows, pos][:, move_ids]).sum(-1)
    answer_loss = ((nll * answer).sum() + move_weight * soft_ce.sum()) / (answer.sum() + move_weight * len(rows))
    return answer_loss + prompt_weight * (nll * prompt).sum() / prompt.sum().clamp(min=1.0)


def train(model, encoded, *, steps: int, batch_size: int, lr: float, seed: int, pad_id: int, move_ids: list[int],
          move_weight: float = 8.0, prompt_weight: float = 1.0, log_every: int = 50, callback=None):
    """AdamW (warm-up, cosine to 10 %), bf16 autocast with fp32 weights; `callback(step, model)` every log."""
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, min(30, steps // 10))

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(optim, schedule)
    model.train()
    queue: list = []
    start, running = time.time(), None
    for step in range(steps):
        if not queue:
            queue = batches(rng, encoded, batch_size)
        ids, mask, labels, soft = collate(encoded, queue.pop(), pad_id)
        # Right padding under a causal mask: no real token sees a pad, so no attention mask is needed (faster).
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=ids).logits
        loss = loss_fn(logits, ids, mask, labels, soft, move_ids, move_weight, prompt_weight)
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            print(f"  step {step + 1:4d}/{steps}  loss {running:.3f}  ({time.time() - start:.0f}s)", flush=True)
            if callback is not None:
                paused = time.time()
                model.eval()
                callback(step + 1, model)
                model.train()
                start += time.time() - paused
    model.eval()


# ---------------------------------------------------------------------------------------------------------------
# Measured behaviour


def report(model, tokenizer, n_games: int) -> dict:
    """Measured behaviour on held-out games, played and prompted by the pipeline's own engine and rollout (as the
    evaluate and extract stages do): with and without a pool experience, and the extractor's answers."""
    from omegaconf import OmegaConf

    from oel_hpc.engines.hf import HFEngine
    from oel_hpc.experience import parse_items, render
    from oel_hpc.games import heldout_seeds
    from oel_hpc.rollout import play_games

    engine = HFEngine(model, tokenizer)
    builder = prompt_builder(engine.count_chat_tokens)
    sampling = OmegaConf.create({"temperature": 0.7, "top_p": 0.8, "top_k": 20,
                                 "max_new_tokens": MAX_NEW_TOKENS_TURN})

    def play(experience):
        games = play_games(engine, builder, "frozenlake", heldout_seeds(n_games), max_turns=5, sampling=sampling,
                           sampling_seed=0, experience=experience)
        turns = [t for g in games for t in g.turns]
        return games, {"pass_rate": sum(g.success for g in games) / len(games),
                       "valid_rate": sum(t.valid for t in turns) / len(turns),
                       "mean_tokens": sum(len(t.response_token_ids) for t in turns) / len(turns), "turns": len(turns)}

    played, plain = play(None)
    _, with_exp = play(render(EVAL_EXPERIENCE, MARKER))
    previous = render(EVAL_EXPERIENCE[:2], MARKER)
    prompts = [engine.chat_ids(builder.extractor([(t.log_blocks[-1], t.response) for t in g.turns], g.ending,
                                                 previous if i >= 16 else None, marker=MARKER))
               for i, g in enumerate(played[:32])]
    answers = [c.text for c in engine.generate(prompts, OmegaConf.merge(
        sampling, {"max_new_tokens": MAX_NEW_TOKENS_EXTRACT}), seed=0)]
    items = [parse_items(a, MARKER) for a in answers]
    return {"heldout_games": n_games, "without_experience": plain, "with_experience": with_exp,
            "extractor": {"answers": len(answers), "parsed": sum(bool(i) for i in items) / len(items),
                          "mean_items": sum(map(len, items)) / len(items),
                          "in_pool": sum(x in POOL_ITEMS for i in items for x in i) / max(1, sum(map(len, items))),
                          "example": answers[0]}}


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=340, help="optimizer steps (default 340)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (warm-up, cosine to 10%%)")
    parser.add_argument("--move-weight", type=float, default=8.0, help="loss weight of the action token")
    parser.add_argument("--prompt-weight", type=float, default=1.0, help="loss weight of the prompt tokens")
    parser.add_argument("--vocab-size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-games", type=int, default=64, help="held-out games for the report (0 = none)")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(2)
    t0 = time.time()
    rng = random.Random(args.seed)
    n_examples = max(256, min(args.steps * args.batch_size, 12_000))
    examples = make_examples(rng, n_examples, prompt_builder())
    print(f"data: {len(examples)} examples ({time.time() - t0:.0f}s)", flush=True)

    tokenizer = train_tokenizer(corpus_texts(examples), args.vocab_size)
    encoded = encode(tokenizer, examples)
    prompt_lengths = sorted(len(e[0]) for e in encoded)
    print(f"tokenizer: vocab {len(tokenizer)}; prompt tokens median {prompt_lengths[len(encoded) // 2]}, "
          f"max {prompt_lengths[-1]} ({time.time() - t0:.0f}s)", flush=True)

    model = make_model(tokenizer, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: Qwen3, {n_params:,} parameters; training {args.steps} steps x {args.batch_size}", flush=True)
    train(model, encoded, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
          pad_id=tokenizer.pad_token_id, move_ids=action_token_ids(tokenizer), move_weight=args.move_weight,
          prompt_weight=args.prompt_weight)

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    build_s = time.time() - t0
    size = sum(p.stat().st_size for p in args.out.iterdir() if p.is_file())
    print(f"saved {args.out} ({size / 1e6:.2f} MB, {n_params:,} parameters) in {build_s:.0f}s", flush=True)

    if args.eval_games:
        r = report(model, tokenizer, args.eval_games)
        print(f"behaviour on {args.eval_games} held-out games (T 0.7, top-p 0.8, top-k 20):")
        for name in ("without_experience", "with_experience"):
            x = r[name]
            print(f"  {name.replace('_', ' '):20s} pass rate {x['pass_rate']:.3f}  valid actions "
                  f"{x['valid_rate']:.3f}  mean answer {x['mean_tokens']:.1f} tokens")
        e = r["extractor"]
        print(f"  extractor: {e['parsed']:.0%} of {e['answers']} answers parse, {e['mean_items']:.1f} items each, "
              f"{e['in_pool']:.0%} verbatim pool lessons; e.g.\n    " + e["example"].replace("\n", "\n    "))
        print(json.dumps({"build_seconds": round(build_s, 1), "folder_mb": round(size / 1e6, 2),
                          "parameters": n_params, **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
