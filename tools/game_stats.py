"""The games' numbers for a recipe's protocol: board parity with textarena, the held-out set's difficulty, seeds.

    python tools/game_stats.py [--parity-seeds 1000] [--recipe sokoban_qwen3_4b_instruct]

Prints, for both board generators (oel, textarena) under the recipe's seed scheme: the held-out Frozen Lake maps
(distinct, shortest paths) and Sokoban rooms (share solvable within env.max_turns moves, share of 1-move rooms,
the length histogram); whether any training seed is a held-out seed and how many training *boards* equal a
held-out board; deployment seeds shared between rounds; and, when textarena 0.7.4 is installed, how many of
seeds 0..N-1 deal a layout identical to textarena's (the parity test, tests/test_textarena_parity.py, checks
more). Torch-free; a few seconds.
"""
from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from oel_hpc.games import (  # noqa: E402
    FrozenLake3x3Env, Sokoban6x6Env, deploy_seeds, extract_seed, heldout_seeds, solution_length,
)
from oel_hpc.games.seeds import heldout_collisions  # noqa: E402

ENVS = {"frozenlake": FrozenLake3x3Env, "sokoban": Sokoban6x6Env}


def boards(game: str, generator: str, seeds) -> list:
    env = ENVS[game](generator=generator)
    return [env.reset(seed=s)[1]["state"] for s in seeds]


def heldout_table(scheme: str, n: int, max_turns: int) -> None:
    print(f"held-out set: {n} games, env.seeds={scheme}")
    print(f"{'generator':<10} {'FL maps':>8} {'FL shortest':>12} {'SO <=' + str(max_turns):>8} {'SO 1-move':>10}"
          "  Sokoban shortest-solution lengths")
    for generator in ("oel", "textarena"):
        seeds = heldout_seeds(n, scheme)
        lakes, rooms = boards("frozenlake", generator, seeds), boards("sokoban", generator, seeds)
        fl_len = collections.Counter(solution_length("frozenlake", s) for s in lakes)
        so_len = collections.Counter(solution_length("sokoban", s) for s in rooms)
        within = sum(v for k, v in so_len.items() if k <= max_turns) / n
        print(f"{generator:<10} {len({s.holes for s in lakes}):>8} {str(dict(fl_len)):>12} {within:>8.1%} "
              f"{so_len[1] / n:>10.1%}  {dict(sorted(so_len.items()))}")


def seed_table(cfg) -> None:
    scheme, rounds = cfg["seeds"], cfg["rounds"]
    n_held = cfg["heldout"]
    clash = heldout_collisions(scheme, heldout=n_held, rounds=rounds, extract_seeds=cfg["extract_seeds"],
                               extract_steps=cfg["extract_steps"], shared_extract=cfg["shared"],
                               deploy_steps=cfg["deploy_steps"], deploy_games=cfg["deploy_games"])
    print(f"\nseeds ({scheme}): training seeds that are held-out seeds: {len(clash)}")
    tasks = 1 if cfg["shared"] else cfg["extract_seeds"]
    per_round = {
        r: {"extract": [extract_seed(r, t, k, scheme=scheme, shared=cfg["shared"])
                        for t in range(tasks) for k in range(1, cfg["extract_steps"] + 1)],
            "deploy": [s for k in range(1, cfg["deploy_steps"] + 1)
                       for s in deploy_seeds(r, k, cfg["deploy_games"], scheme=scheme)]}
        for r in range(1, rounds + 1)}
    for r in range(2, rounds + 1):
        repeated = set(per_round[r]["deploy"]) & {s for q in range(1, r) for s in per_round[q]["deploy"]}
        print(f"  round {r}: deployment seeds already dealt in an earlier round: {len(repeated)} of "
              f"{len(per_round[r]['deploy'])}")
    game = cfg["game"]
    for generator in ("oel", "textarena"):
        held = set(boards(game, generator, heldout_seeds(n_held, scheme)))
        for stage in ("extract", "deploy"):
            seeds = sorted({s for r in per_round for s in per_round[r][stage]})
            same = sum(b in held for b in boards(game, generator, seeds))
            print(f"  {game}, generator {generator}: {stage} boards equal to a held-out board: "
                  f"{same} of {len(seeds)} ({same / len(seeds):.1%})")


def parity(n: int) -> None:
    try:
        import numpy as np
        import textarena as ta
    except ImportError:
        print("\nparity: textarena is not installed (pip install textarena==0.7.4)")
        return
    fl = ta.make(env_id="FrozenLake-v0-raw", size=3, num_holes=2, randomize_start_goal=False)
    so = ta.make(env_id="Sokoban-v0", num_boxes=1, dim_room=(6, 6))
    ours_fl, ours_so = boards("frozenlake", "textarena", range(n)), boards("sokoban", "textarena", range(n))
    oel_fl, oel_so = boards("frozenlake", "oel", range(n)), boards("sokoban", "oel", range(n))
    same = collections.Counter()
    for seed in range(n):
        fl.reset(num_players=1, seed=seed)
        grid = fl.state.game_state["grid"]
        holes = tuple(sorted((r, c) for r in range(3) for c in range(3) if grid[r][c] == "H"))
        same["fl textarena"] += ours_fl[seed].holes == holes
        same["fl oel"] += oel_fl[seed].holes == holes
        so.reset(num_players=1, seed=seed)
        fixed, room = so.room_fixed, so.room_state
        layout = (tuple("".join("#" if v == 0 else "_" for v in row) for row in fixed),
                  tuple(int(x) for x in np.argwhere(fixed == 2)[0]),
                  tuple(int(x) for x in np.argwhere(np.isin(room, (3, 4)))[0]),
                  tuple(int(x) for x in np.argwhere(room == 5)[0]))
        for name, state in (("so textarena", ours_so[seed]), ("so oel", oel_so[seed])):
            same[name] += (tuple(state.grid), state.target, state.box, state.player) == layout
    print(f"\nparity with textarena {ta.__version__}, seeds 0..{n - 1}: layouts identical")
    for generator in ("textarena", "oel"):
        print(f"  generator {generator:<9}  Frozen Lake {same['fl ' + generator]:>5} / {n}   "
              f"Sokoban {same['so ' + generator]:>5} / {n}")


def recipe_numbers(name: str) -> dict:
    from hydra import compose, initialize_config_dir

    from oel_hpc.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={name}"])
    return {"game": cfg.env.name, "seeds": cfg.env.seeds, "rounds": cfg.pipeline.rounds,
            "heldout": max(cfg.evaluate.games, cfg.extract.eval_games), "extract_seeds": cfg.extract.seeds,
            "extract_steps": cfg.extract.steps, "shared": cfg.extract.shared_games, "deploy_steps": cfg.deploy.steps,
            "deploy_games": cfg.deploy.games_per_step, "max_turns": cfg.env.max_turns}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="sokoban_qwen3_4b_instruct", help="a conf/experiment name")
    parser.add_argument("--parity-seeds", type=int, default=1000)
    args = parser.parse_args()
    cfg = recipe_numbers(args.recipe)
    print(f"recipe {args.recipe}")
    heldout_table(cfg["seeds"], cfg["heldout"], cfg["max_turns"])
    seed_table(cfg)
    parity(args.parity_seeds)


if __name__ == "__main__":
    main()
