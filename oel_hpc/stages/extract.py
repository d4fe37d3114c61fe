"""Extract: one seed's policy plays one game per step with no experience; after each game the same model reads
the game (observations, its full responses, how it ended, the outcome) and writes new experience, which is
appended and capped. `experience_<k>.txt` is saved after every step; optionally the held-out games are played with
the current experience before each update (`scores.jsonl`, the knowledge-growth curve). The extractor samples with
its own budget (extract.extractor_sampling); an answer cut off by it gives nothing and is counted
(`extractor_truncated` in games.jsonl)."""
from __future__ import annotations

from pathlib import Path

from oel_hpc import experience as exp
from oel_hpc import log
from oel_hpc.games.seeds import extract_seed, heldout_seeds
from oel_hpc.rollout import derive_seed, game_rules, play_games
from oel_hpc.rundir import write_jsonl_atomic, write_text_atomic
from oel_hpc.stages.common import StageContext

logger = log.get_logger(__name__)


def run(ctx: StageContext, r: int, seed: int) -> list[Path]:
    cfg, paths = ctx.cfg, ctx.paths
    engine = ctx.round_engine(r, "extract")
    builder = ctx.prompt_builder(engine)
    fmt = exp.ExperienceFormat(cfg.experience.mode, cfg.experience.marker, cfg.experience.parse)
    sampling = cfg.extract.sampling
    items: list[str] = []
    games, scores, outputs = [], [], []

    def score(step: int) -> None:
        text = fmt.render(items) or None
        seeds = heldout_seeds(cfg.extract.eval_games, cfg.env.seeds)
        results = play_games(engine, builder, cfg.env.name, seeds, max_turns=cfg.env.max_turns,
                             sampling=sampling, experience=text, **game_rules(cfg.env),
                             sampling_seed=derive_seed("scores", cfg.pipeline.seed, r, seed, step),
                             desc=f"r{r} extract seed {seed} scores")
        scores.append({"step": step, "pass_rate": sum(g.success for g in results) / len(results),
                       "experience_tokens": engine.count_tokens(text or "")})

    def extract_step(step: int) -> Path:
        nonlocal items
        game_seed = extract_seed(r, seed, step, scheme=cfg.env.seeds, shared=cfg.extract.shared_games)
        [game] = play_games(engine, builder, cfg.env.name, [game_seed], max_turns=cfg.env.max_turns,
                            **game_rules(cfg.env),
                            sampling=sampling, sampling_seed=derive_seed("extract", cfg.pipeline.seed, r, seed, step),
                            desc="game")
        previous = fmt.render(items) if cfg.extract.show_previous and items else None
        history = [(t.log_blocks[-1], t.response) for t in game.turns]
        messages = builder.extractor(history, game.ending, previous, mode=fmt.mode, marker=fmt.marker)
        [answer] = engine.generate([engine.chat_ids(messages)], cfg.extract.extractor_sampling,
                                   seed=derive_seed("extractor", cfg.pipeline.seed, r, seed, step))
        reading = fmt.read(answer.text, finished=answer.finished, thinking=cfg.model.thinking)
        items = fmt.append_capped(items, reading.items, cfg.experience.max_tokens, engine.count_tokens)
        path = paths.experience(r, seed, step)
        write_text_atomic(path, fmt.render(items))
        games.append({"step": step, "game_seed": game_seed, "success": game.success, "turns": len(game.turns),
                      "end_reason": game.end_reason, "responses": [t.response for t in game.turns],
                      "valid": [t.valid for t in game.turns],
                      "final_log": game.final_log, "extractor_prompt": messages, "extractor_response": answer.text,
                      "extractor_tokens": len(answer.token_ids), "extractor_truncated": reading.truncated,
                      "new_items": reading.items})
        return path

    with ctx.record(r, "extract", seed, total=cfg.extract.steps) as record:
        if cfg.extract.eval_games:
            score(0)
        for step in log.progress(range(1, cfg.extract.steps + 1), desc=f"r{r} extract seed {seed}", unit="step"):
            outputs.append(extract_step(step))
            if cfg.extract.eval_games:  # scores.jsonl step k: the held-out games with the experience after step k
                score(step)
            text = fmt.render(items)
            record.step(step, experience_items=len(items), experience_tokens=engine.count_tokens(text),
                        success=bool(games[-1]["success"]),
                        **({"heldout_pass_rate": scores[-1]["pass_rate"]} if cfg.extract.eval_games else {}))
    truncated = sum(g["extractor_truncated"] for g in games)
    if truncated:
        logger.warning(f"{truncated} of {len(games)} extractor answers were cut off at "
              f"extract.extractor_sampling.max_new_tokens={cfg.extract.extractor_sampling.max_new_tokens} "
              "(no experience taken from a cut-off answer's unfinished part)")

    seed_dir = paths.seed_dir(r, seed)
    write_jsonl_atomic(seed_dir / "games.jsonl", games)
    write_jsonl_atomic(seed_dir / "scores.jsonl", scores)
    return outputs + [seed_dir / "games.jsonl", seed_dir / "scores.jsonl"]
