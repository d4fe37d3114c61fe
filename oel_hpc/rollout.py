"""Plays a batch of games turn by turn: one engine call per turn for all games still running."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

from oel_hpc import log
from oel_hpc.games import make_game
from oel_hpc.prompts import Ending, PromptBuilder


def derive_seed(*parts) -> int:
    """A sampling seed from named parts (stage, round, step, ...): stable across processes and Python versions."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little") & 0x7FFFFFFF


@dataclass
class Turn:
    turn: int
    messages: list[dict]
    prompt_token_ids: list[int]
    log_blocks: list[str]  # the game log the prompt shows: lets consolidation rebuild it with experience
    response: str
    response_token_ids: list[int]
    action: Optional[str]
    valid: bool


@dataclass
class GameResult:
    game_seed: int
    success: bool = False
    turns: list[Turn] = field(default_factory=list)
    final_log: str = ""
    end_reason: str = ""  # goal | hole | invalid_moves | turn_limit (games.END_REASONS, TextGame.end_reason)
    final_block: str = ""  # the log's last block: the last move, its message, the final board

    @property
    def mean_response_tokens(self) -> float:
        return sum(len(t.response_token_ids) for t in self.turns) / max(len(self.turns), 1)

    @property
    def ending(self) -> Ending:
        return Ending(self.success, self.end_reason, self.final_block)


def game_rules(env_cfg) -> dict:
    """The board generator and the invalid-move rule of the ``env`` config section, as ``play_games`` takes them."""
    return {"generator": env_cfg.generator, "invalid_move_limit": env_cfg.invalid_move_limit}


def play_games(engine, builder: PromptBuilder, env_name: str, game_seeds: Sequence[int], *, max_turns: int,
               sampling, sampling_seed: int, experience: Optional[str] = None, desc: str = "games",
               generator: str = "oel", invalid_move_limit: Optional[int] = None) -> list[GameResult]:
    games = [make_game(env_name, s, max_calls=max_turns, generator=generator, invalid_move_limit=invalid_move_limit,
                       text=builder.game_text) for s in game_seeds]
    for game, s in zip(games, game_seeds):
        game.reset(seed=s)
    results = [GameResult(s) for s in game_seeds]
    for turn in log.progress(range(1, max_turns + 1), desc=desc, unit="turn"):
        live = [i for i, g in enumerate(games) if not g.done]
        if not live:
            break
        messages = [builder.game_turn(games[i].log_blocks, games[i].action_words, experience) for i in live]
        prompt_ids = [engine.chat_ids(m) for m in messages]
        completions = engine.generate(prompt_ids, sampling, seed=derive_seed(sampling_seed, turn))
        for i, msgs, ids, c in zip(live, messages, prompt_ids, completions):
            blocks = list(games[i].log_blocks)
            _, _, _, _, info = games[i].step(c.text)
            results[i].turns.append(Turn(turn, msgs, ids, blocks, c.text, c.token_ids,
                                         info.get("action"), bool(info.get("valid"))))
            if games[i].done:
                results[i].success, results[i].final_log = bool(games[i].success), games[i].game_log
                results[i].end_reason, results[i].final_block = games[i].end_reason, games[i].log_blocks[-1]
    return results
