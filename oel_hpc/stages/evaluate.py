"""Evaluate: pass rate, mean response tokens and mean turns of one checkpoint on the fixed held-out games, with
no experience in context. Step 0 is the round's starting model; the last step is the exported model."""
from __future__ import annotations

from oel_hpc.games.seeds import heldout_seeds
from oel_hpc.pipeline import model_path
from oel_hpc.rollout import derive_seed, game_rules, play_games
from oel_hpc.rundir import mark_done, write_json_atomic
from oel_hpc.stages.common import StageContext


def checkpoint_model(ctx: StageContext, r: int, step: int) -> str:
    if step == 0:
        return model_path(ctx.cfg, ctx.paths, r)
    if step == ctx.cfg.consolidate.steps:
        return str(ctx.paths.hf(r))
    from oel_hpc.train.checkpoint import export_for_eval

    return str(export_for_eval(ctx.cfg, ctx.paths, r, step))


def run(ctx: StageContext, r: int, step: int) -> None:
    cfg, paths = ctx.cfg, ctx.paths
    model = checkpoint_model(ctx, r, step)
    engine = ctx.engine(model)
    seeds = heldout_seeds(cfg.evaluate.games, cfg.env.seeds)
    games = play_games(engine, ctx.prompt_builder(engine), cfg.env.name, seeds,
                       max_turns=cfg.env.max_turns, sampling=cfg.evaluate.sampling, **game_rules(cfg.env),
                       sampling_seed=derive_seed("evaluate", cfg.pipeline.seed), desc=f"r{r} eval step {step}")
    turns = [t for g in games for t in g.turns]
    result = {
        "round": r, "step": step, "model": paths.display(model),
        "games": len(games), "pass_rate": sum(g.success for g in games) / len(games),
        "mean_response_tokens": sum(len(t.response_token_ids) for t in turns) / len(turns),
        "mean_turns": len(turns) / len(games),
        "invalid_rate": sum(not t.valid for t in turns) / len(turns),
    }
    write_json_atomic(paths.eval_result(r, step), result)
    mark_done(paths, paths.done(r, "evaluate", step), ctx.stage_hash(r, "evaluate"), [paths.eval_result(r, step)])
