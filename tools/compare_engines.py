"""Greedy game play through both engines on the same model: do vLLM and HF `generate` give the same responses?

    python tools/compare_engines.py experiment=smollm2_frozenlake --games 8 --new-tokens 64

Composes the config from the overrides (the recipe's model, prompts and game), plays the same held-out games with
temperature 0 through `engine=hf` and `engine=vllm`, and prints how many turns and games are identical and, for the
first turn that is not, where the two responses part. Greedy tokens can differ only where two logits are within
float rounding of each other. Exit status 1 when any turn differs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. experiment=smollm2_frozenlake")
    parser.add_argument("--games", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64, help="max new tokens per turn")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (starts faster)")
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from oel_hpc.__main__ import compose_config
    from oel_hpc.config import resolve_model_dir
    from oel_hpc.engines.hf import HFEngine
    from oel_hpc.engines.vllm_engine import VLLMEngine
    from oel_hpc.games.seeds import heldout_seeds
    from oel_hpc.prompts import PromptBuilder, context_needed, prompt_budgets
    from oel_hpc.rollout import game_rules, play_games

    cfg = compose_config(args.overrides)
    path = str(resolve_model_dir(cfg.model.path) or cfg.model.path)
    options = OmegaConf.merge(cfg.engine.vllm, {"enforce_eager": args.enforce_eager or cfg.engine.vllm.enforce_eager})
    sampling = OmegaConf.merge(cfg.evaluate.sampling, {"temperature": 0.0, "max_new_tokens": args.new_tokens})
    seeds = heldout_seeds(args.games, cfg.env.seeds)
    engines = {"hf": lambda: HFEngine.load(path, dtype=cfg.model.dtype, device="auto", thinking=cfg.model.thinking),
               "vllm": lambda: VLLMEngine.load(path, dtype=cfg.model.dtype, thinking=cfg.model.thinking,
                                               options=options, context=context_needed(cfg, "evaluate"))}
    played = {}
    for name, load in engines.items():
        start = time.perf_counter()
        engine = load()
        loaded = time.perf_counter()
        builder = PromptBuilder(cfg.prompts, engine.count_chat_tokens, *prompt_budgets(cfg))
        played[name] = play_games(engine, builder, cfg.env.name, seeds, max_turns=cfg.env.max_turns,
                                  sampling=sampling, sampling_seed=0, desc=f"{name} games", **game_rules(cfg.env))
        print(f"{name:5s} start {loaded - start:6.1f} s, {len(seeds)} games {time.perf_counter() - loaded:6.1f} s")
        if hasattr(engine, "close"):
            engine.close()
        del engine

    pairs = [(a, b) for ga, gb in zip(played["vllm"], played["hf"]) for a, b in zip(ga.turns, gb.turns)]
    same_turns = sum(a.response_token_ids == b.response_token_ids for a, b in pairs)
    same_games = sum([t.response_token_ids for t in ga.turns] == [t.response_token_ids for t in gb.turns]
                     for ga, gb in zip(played["vllm"], played["hf"]))
    print(f"model {path}: {same_turns} of {len(pairs)} turns and {same_games} of {len(seeds)} games identical")
    for a, b in pairs:
        if a.response_token_ids != b.response_token_ids:
            x, y = a.response_token_ids, b.response_token_ids
            k = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
            print(f"first difference: turn {a.turn}, token {k} of {len(x)} (vllm) / {len(y)} (hf)")
            return 1
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
