"""Deploy: the current policy plays fresh games with no experience, as a user would; every turn prompt it saw is
saved, one file per consolidation step, with the game's outcome so the data stands on its own."""
from __future__ import annotations

from pathlib import Path

from oel_hpc import log
from oel_hpc.games.seeds import deploy_seeds
from oel_hpc.pipeline import model_path
from oel_hpc.rollout import derive_seed, game_rules, play_games
from oel_hpc.rundir import read_jsonl, write_jsonl_atomic
from oel_hpc.stages.common import StageContext


def run(ctx: StageContext, r: int, task=None) -> list[Path]:
    cfg, paths = ctx.cfg, ctx.paths
    engine = ctx.round_engine(r, "deploy")
    builder = ctx.prompt_builder(engine)
    policy = paths.display(model_path(cfg, paths, r))
    outputs = []
    with ctx.record(r, "deploy", None, total=cfg.deploy.steps) as record:
        for step in log.progress(range(1, cfg.deploy.steps + 1), desc=f"r{r} deploy", unit="step"):
            out = paths.deploy_step(r, step)
            outputs.append(out)
            # a file there was written atomically by an earlier, interrupted attempt: complete as it is
            rows = read_jsonl(out) if out.is_file() else _play(ctx, r, step, engine, builder, policy, out)
            games = {row["game_seed"]: row["success"] for row in rows}
            record.step(step, games=len(games), pass_rate=sum(games.values()) / max(len(games), 1),
                        turn_prompts=len(rows))
    return outputs


def _play(ctx: StageContext, r: int, step: int, engine, builder, policy: str, out: Path) -> list[dict]:
    """Step `step`'s games, their turn prompts written to `out`; the rows written."""
    cfg = ctx.cfg
    seeds = deploy_seeds(r, step, cfg.deploy.games_per_step, scheme=cfg.env.seeds)
    games = play_games(engine, builder, cfg.env.name, seeds, max_turns=cfg.env.max_turns,
                       **game_rules(cfg.env), sampling=cfg.deploy.sampling,
                       sampling_seed=derive_seed("deploy", cfg.pipeline.seed, r, step),
                       desc=f"r{r} deploy step {step}")
    rows = [{"game_seed": g.game_seed, "turn": t.turn, "messages": t.messages, "prompt_token_ids": t.prompt_token_ids,
             "log_blocks": t.log_blocks, "response": t.response, "response_token_ids": t.response_token_ids,
             "action": t.action, "valid": t.valid, "policy": policy, "success": g.success, "turns": len(g.turns)}
            for g in games for t in g.turns]
    write_jsonl_atomic(out, rows)
    return rows
