"""Chat prompts for a game turn (with or without experience) and for the extractor, from the config's templates.

A prompt over its token budget is never cut at the end (that would lose the current board and the generation
cue): the oldest game-log blocks, or the oldest extractor turns, are dropped and replaced by one `omitted_turns`
line; if even the newest block alone does not fit, PromptTooLong names the budget to raise.
"""
from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from oel_hpc.games import join_blocks

Messages = list[dict[str, str]]

OPTIONAL_FIELDS = {"extractor_turn": {"turn"}}
REQUIRED_FIELDS = {
    "game_turn": {"actions", "experience_block", "game_log"},
    "experience_block": {"experience"},
    "extractor": {"history", "outcome", "previous_block", "marker"},
    "extractor_previous_block": {"experience"},
    "extractor_turn": {"observation", "response"},
}


class PromptTooLong(ValueError):
    pass


def template_fields(text: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(text) if name is not None}


def check_template(name: str, text: str) -> None:
    """A template must use exactly its placeholders: a typo would otherwise drop the game log silently."""
    from oel_hpc.config import ConfigError

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


@dataclass
class PromptBuilder:
    """Renders prompts as chat messages; `count_tokens(messages)` measures a prompt as the model will see it."""

    templates: Any  # PromptsConfig or anything with the same attributes
    count_tokens: Callable[[Messages], int]
    turn_budget: int
    extractor_budget: int

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

    def extractor(self, turns: Sequence[tuple[str, str]], outcome: str, marker: str,
                  previous: Optional[str] = None) -> Messages:
        """The extractor prompt: each turn's observation and full response, the outcome, optionally prior items."""
        t = self.templates
        previous_block = t.extractor_previous_block.format(experience=previous) if previous else ""
        rendered = [t.extractor_turn.format(turn=i + 1, observation=obs, response=resp)
                    for i, (obs, resp) in enumerate(turns)]

        def render(blocks: Sequence[str]) -> Messages:
            return self.chat(t.extractor.format(history=join_blocks(blocks), outcome=outcome,
                                                previous_block=previous_block, marker=marker))

        return self._fit(rendered, render, self.extractor_budget, "extractor",
                         "experience.max_tokens or the sampling max_new_tokens")

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
