"""Chat prompts for a game turn (with or without experience) and for the extractor, from the config's templates,
and the checks a prompt set must pass (every template's placeholders, the wording tables, the games' text table).

A prompt over its token budget is never cut at the end (that would lose the current board and the generation
cue): the oldest game-log blocks, or the oldest extractor turns, are dropped and replaced by one `omitted_turns`
line; if even the newest block alone does not fit, PromptTooLong names the budget to raise.
"""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from omegaconf import OmegaConf

from oel_hpc.errors import ConfigError, PromptTooLong
from oel_hpc.games import join_blocks
from oel_hpc.games.text import END_REASONS, TextTableError, check_game_text

Messages = list[dict[str, str]]

OPTIONAL_FIELDS = {"extractor_turn": {"turn"}}
REQUIRED_FIELDS = {
    "game_turn": {"actions", "experience_block", "game_log"},
    "experience_block": {"experience"},
    "extractor": {"history", "ending", "outcome", "previous_block", "marker"},
    "extractor_free_text": {"history", "ending", "outcome", "previous_block"},
    "extractor_previous_block": {"experience"},
    "extractor_turn": {"observation", "response"},
    "extractor_ending": {"final_block", "reason"},
}
OUTCOMES = ("success", "failure")


@dataclass(frozen=True)
class Ending:
    """How a game ended, for the extractor: won or not, why (a code of games.protocol.END_REASONS), and the game
    log's last block (the last move, its message and the final board)."""

    success: bool
    reason: str
    final_block: str


def prompt_budgets(cfg: Any) -> tuple[int, int]:
    """(game turn, extractor) prompt budgets in tokens. A turn prompt holds the experience and at most
    env.max_turns log blocks; the extractor's holds the experience so far, every turn's block and full response
    (each at most extract.sampling.max_new_tokens) and the ending's final block."""
    turn = cfg.experience.max_tokens + cfg.prompts.tokens_per_turn * cfg.env.max_turns
    extractor = turn + cfg.prompts.tokens_per_turn + cfg.extract.sampling.max_new_tokens * cfg.env.max_turns
    return turn, extractor


def context_needed(cfg: Any, stage: str) -> int:
    """The most tokens one of a stage's prompts at its budget plus its answer may take (a game turn; in extract also
    the extractor's): what an engine that sizes its sequences (vLLM's max_model_len) must hold. Read from keys in the
    stage's own config hash; the figure itself changes no result."""
    turn, extractor = prompt_budgets(cfg)
    need = turn + cfg[stage].sampling.max_new_tokens
    if stage == "extract":
        need = max(need, extractor + cfg.extract.extractor_sampling.max_new_tokens)
    return need


def check_context(cfg: Any, context: int) -> None:
    """A prompt at its budget plus the new tokens it may get must fit the model's context (max_position_embeddings):
    beyond it a model's output is not what it was trained for."""

    turn, extractor = prompt_budgets(cfg)
    new = max(cfg[stage].sampling.max_new_tokens for stage in ("extract", "deploy", "consolidate", "evaluate"))
    if turn + new > context:
        raise ConfigError("prompts.tokens_per_turn", f"a game turn may need {turn} prompt + {new} new tokens, more "
                          f"than the model's context of {context}: lower experience.max_tokens, "
                          "prompts.tokens_per_turn or a stage's sampling.max_new_tokens")
    answer = cfg.extract.extractor_sampling.max_new_tokens
    if extractor + answer > context:
        raise ConfigError("extract.extractor_sampling.max_new_tokens",
                          f"the extractor may need {extractor} prompt + {answer} new tokens, more than the model's "
                          f"context of {context}: lower it, experience.max_tokens, prompts.tokens_per_turn or "
                          "extract.sampling.max_new_tokens")


def template_fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def check_template(name: str, text: str) -> None:
    """A template must use exactly its placeholders: a typo would otherwise drop the game log silently."""

    try:
        fields = template_fields(text)
    except ValueError as e:
        raise ConfigError(f"prompts.{name}", f"is not a valid template ({e}); write literal braces as {{{{ }}}}")
    required = REQUIRED_FIELDS[name]
    allowed = required | OPTIONAL_FIELDS.get(name, set())
    if fields - allowed:
        raise ConfigError(f"prompts.{name}", f"unknown placeholder(s) {sorted(fields - allowed)}; allowed {sorted(allowed)}")
    if required - fields:
        raise ConfigError(f"prompts.{name}", f"missing placeholder(s) {sorted(required - fields)}")


def check_wording(name: str, table: Any, keys: Sequence[str]) -> None:
    """A plain wording table (prompts.outcomes, prompts.end_reasons): exactly `keys`, each a non-empty string."""

    key = f"prompts.{name}"
    if not isinstance(table, dict):
        raise ConfigError(key, f"must be a mapping with the keys {list(keys)}")
    if set(table) - set(keys):
        raise ConfigError(f"{key}.{sorted(set(table) - set(keys))[0]}", f"unknown key (allowed: {', '.join(keys)})")
    for k in keys:
        if not isinstance(table.get(k), str) or not table[k].strip():
            raise ConfigError(f"{key}.{k}", f"must be a non-empty string, got {table.get(k)!r}")


def check_prompts(prompts: Any, free_text: bool) -> None:
    """Every template and wording table of a prompt set (`prompts` config section); ConfigError names the key.
    `free_text`: experience.mode is free_text, so prompts.extractor_free_text must be given."""

    for name in REQUIRED_FIELDS:
        text = _get(prompts, name)
        if name == "extractor_free_text" and text is None:
            if free_text:
                raise ConfigError("prompts.extractor_free_text", "is needed by experience.mode=free_text (the "
                                  "extractor template without {marker})")
            continue
        if not isinstance(text, str):
            raise ConfigError(f"prompts.{name}", f"must be a template string, got {text!r}")
        check_template(name, text)
    check_wording("outcomes", _plain(_get(prompts, "outcomes")), OUTCOMES)
    check_wording("end_reasons", _plain(_get(prompts, "end_reasons")), END_REASONS)
    try:
        check_game_text(_plain(_get(prompts, "game_text")))
    except TextTableError as e:
        key = f"prompts.game_text.{e.key}" if e.key else "prompts.game_text"
        raise ConfigError(key, str(e).split(": ", 1)[1]) from None


def _get(prompts: Any, name: str) -> Any:

    if OmegaConf.is_config(prompts) and OmegaConf.is_missing(prompts, name):
        raise ConfigError(f"prompts.{name}", "missing: every prompt set gives it (conf/prompts/default.yaml lists "
                          "them all)")
    return prompts.get(name)


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@dataclass
class PromptBuilder:
    """Renders prompts as chat messages; `count_tokens(messages)` measures a prompt as the model will see it.
    `game_text` is the wording table the games render their log with (prompts.game_text, as plain dicts)."""

    templates: Any  # PromptsConfig or anything with the same attributes
    count_tokens: Callable[[Messages], int]
    turn_budget: int
    extractor_budget: int
    game_text: dict = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.game_text = _plain(self.templates.game_text)

    def chat(self, content: str) -> Messages:
        system = [{"role": "system", "content": self.templates.system}] if self.templates.system else []
        return system + [{"role": "user", "content": content}]

    def experience_block(self, experience: Optional[str]) -> str:
        return self.templates.experience_block.format(experience=experience) if experience else ""

    def game_turn(self, log_blocks: Sequence[str], actions: Sequence[str], experience: Optional[str] = None) -> Messages:
        """The turn prompt: whole game log (no earlier responses), with the experience header when given."""
        block = self.experience_block(experience)

        def render(blocks: Sequence[str]) -> Messages:
            return self.chat(self.templates.game_turn.format(
                actions=", ".join(actions), experience_block=block, game_log=join_blocks(blocks)))

        return self._fit(list(log_blocks), render, self.turn_budget, "game turn",
                         "experience.max_tokens or prompts.tokens_per_turn")

    def ending(self, ending: Ending) -> str:
        """The extractor's lines on how the game ended: its last block and the reason, in the prompt set's words."""
        t = self.templates
        if ending.reason not in t.end_reasons:

            raise ConfigError("prompts.end_reasons", f"has no wording for the end reason '{ending.reason}' "
                              f"(it words: {', '.join(t.end_reasons)})")
        return t.extractor_ending.format(final_block=ending.final_block, reason=t.end_reasons[ending.reason])

    def extractor(self, turns: Sequence[tuple[str, str]], ending: Ending, previous: Optional[str] = None, *,
                  mode: str = "items", marker: str = "- ") -> Messages:
        """The extractor prompt: each turn's observation and full response, how the game ended, the outcome and
        optionally the experience so far. mode "items" asks for marker lines (prompts.extractor), "free_text" for
        one answer (prompts.extractor_free_text)."""
        if mode not in ("items", "free_text"):
            raise ValueError(f"mode must be items or free_text, got {mode!r}")
        t = self.templates
        template = t.extractor if mode == "items" else t.extractor_free_text
        previous_block = t.extractor_previous_block.format(experience=previous) if previous else ""
        rendered = [t.extractor_turn.format(turn=i + 1, observation=obs, response=resp)
                    for i, (obs, resp) in enumerate(turns)]
        fields = dict(ending=self.ending(ending), previous_block=previous_block,
                      outcome=t.outcomes.success if ending.success else t.outcomes.failure)
        if mode == "items":
            fields["marker"] = marker

        def render(blocks: Sequence[str]) -> Messages:
            return self.chat(template.format(history=join_blocks(blocks), **fields))

        return self._fit(rendered, render, self.extractor_budget, "extractor",
                         "experience.max_tokens, prompts.tokens_per_turn or extract.sampling.max_new_tokens")

    def _fit(self, blocks: list[str], render: Callable[[Sequence[str]], Messages], budget: int,
             what: str, knob: str) -> Messages:
        messages = render(blocks)
        n = self.count_tokens(messages)
        dropped = 0
        while n > budget and len(blocks) - dropped > 1:
            dropped += 1
            messages = render([self.templates.omitted_turns] + blocks[dropped:])
            n = self.count_tokens(messages)
        if n > budget:
            raise PromptTooLong(f"{what} prompt needs {n} tokens even with only its newest block, over its budget "
                                f"of {budget}: raise {knob}")
        return messages
