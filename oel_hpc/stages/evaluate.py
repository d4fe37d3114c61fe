"""Evaluate: pass rate, mean response tokens, mean turns and invalid-move rate of one checkpoint on the fixed
held-out games, with no experience in context. Step 0 is the round's starting model; the last step is the exported
model. With evaluate.teacher, step 0 also plays the held-out games *with* experience in context, as the
consolidation's teacher sees its prompts: the level distillation aims at (game i gets experience i mod n, the
round's non-empty experiences in list order)."""
from __future__ import annotations

from pathlib import Path

from oel_hpc.experience import load_experience_list
from oel_hpc.games.seeds import heldout_seeds
from oel_hpc.pipeline import model_path
from oel_hpc.rollout import GameResult, derive_seed, game_rules, play_games
from oel_hpc.rundir import write_json_atomic
from oel_hpc.stages.common import StageContext


def checkpoint_model(ctx: StageContext, r: int, step: int) -> str:
    if step == 0:
        return model_path(ctx.cfg, ctx.paths, r)
    if step == ctx.cfg.consolidate.steps:
        return str(ctx.paths.hf(r))
    from oel_hpc.train.export import export_for_eval

    return str(export_for_eval(ctx.cfg, ctx.paths, r, step))


def scores(games: list[GameResult]) -> dict:
    turns = [t for g in games for t in g.turns]
    return {"games": len(games), "pass_rate": sum(g.success for g in games) / len(games),
            "mean_response_tokens": sum(len(t.response_token_ids) for t in turns) / len(turns),
            "mean_turns": len(turns) / len(games),
            "invalid_rate": sum(not t.valid for t in turns) / len(turns)}


def run(ctx: StageContext, r: int, step: int) -> list[Path]:
    cfg, paths = ctx.cfg, ctx.paths
    model = checkpoint_model(ctx, r, step)
    engine = ctx.engine(model, "evaluate")
    builder = ctx.prompt_builder(engine)
    seeds = heldout_seeds(cfg.evaluate.games, cfg.env.seeds)

    def play(game_seeds, experience=None, desc=f"r{r} eval step {step}"):
        return play_games(engine, builder, cfg.env.name, game_seeds, max_turns=cfg.env.max_turns,
                          sampling=cfg.evaluate.sampling, experience=experience, **game_rules(cfg.env),
                          sampling_seed=derive_seed("evaluate", cfg.pipeline.seed), desc=desc)

    with ctx.record(r, "evaluate", step, total=1, unit="checkpoint") as record:
        result = {"round": r, "step": step, "model": paths.display(model), **scores(play(seeds))}
        if step == 0 and cfg.evaluate.teacher:
            result.update(_teacher(ctx, r, seeds, play))
        write_json_atomic(paths.eval_result(r, step), result)
        measured = {k: v for k, v in result.items() if k not in ("round", "step", "model", "teacher")}
        record.step(1, checkpoint=step, **measured,
                    **{f"teacher_{k}": v for k, v in result.get("teacher", {}).items()})
    return [paths.eval_result(r, step)]


def _teacher(ctx: StageContext, r: int, seeds: list[int], play) -> dict:
    """{"teacher": scores} of the held-out games with the round's experience in context; {} without any."""
    _, texts = load_experience_list(ctx.paths.experience_list(r), ctx.paths.root)
    experiences = [t for t in texts if t.strip()]
    if not experiences:  # consolidation refuses to start (or trains on purpose without); nothing to show
        return {}
    games: list[GameResult] = []
    for k, text in enumerate(experiences):
        games += play(seeds[k::len(experiences)], text, desc=f"r{r} eval teacher {k + 1}/{len(experiences)}")
    return {"teacher": {**scores(games), "experiences": len(experiences)}}
