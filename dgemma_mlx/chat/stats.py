"""What chat turns cost: per-turn statistics, the session snapshot ``/stats`` shows, and the
bookkeeping of a turn in progress."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from ..events import CommitEvent, GenerationStats
from ..render import format_stats

__all__ = ["ChatStats", "TurnStats", "format_chat_stats"]



@dataclass(frozen=True)
class TurnStats:
    """What one turn cost.

    Attributes:
        prompt_tokens: length of the whole conversation as rendered for this turn (generation
            prompt included): what a tool without a cache would encode.
        reused: tokens of it that were already in the cache.
        encoded: tokens of it encoded this turn (``prompt_tokens - reused``).
        reply_encoded: tokens of committed reply blocks encoded during generation (every block but
            the last).
        rewound_from: the cache length before a rewind, or None when the cache was only extended.
        generated: tokens generated (before EOS).
        finish_reason: ``"eos"``, ``"length"`` or ``"cancelled"``.
        generation: the generation's measurements.
    """

    prompt_tokens: int
    reused: int
    encoded: int
    reply_encoded: int = 0
    rewound_from: Optional[int] = None
    generated: int = 0
    finish_reason: str = "cancelled"
    generation: GenerationStats = field(default_factory=GenerationStats)

    @property
    def total_encoded(self) -> int:
        """Every token passed to ``model.encode`` this turn."""
        return self.encoded + self.reply_encoded


@dataclass(frozen=True)
class ChatStats:
    """A snapshot of a session (see :attr:`ChatSession.stats`).

    ``turns`` counts the replies generated since the last reset or load (one :class:`TurnStats`
    each, cancelled replies included); ``messages`` is the length of the conversation.
    """

    turns: int
    messages: int
    cache_tokens: int
    cache_bytes: int
    context: int
    per_turn: tuple[TurnStats, ...]
    last_generation: Optional[GenerationStats]

    @property
    def encoded_per_turn(self) -> list[int]:
        return [t.total_encoded for t in self.per_turn]


@dataclass
class TurnProgress:
    """What a turn has done so far: for its stats, and for the clean-up when it is interrupted."""

    user: dict[str, Any]  # the user message: "role", "content" and, with images, "images"
    target: list[int]  # the conversation with the generation prompt, as rendered for this turn
    prompt_len: int  # tokens of it handed to stream_generate
    reused: int = 0
    encoded: int = 0
    rewound: Optional[int] = None
    prompt_in: bool = False  # stream_generate has encoded its prompt
    reply_encoded: int = 0
    tokens: list[int] = field(default_factory=list)
    blocks: int = 0
    steps: int = 0
    thought: str = ""
    answer: str = ""

    def add(self, commit: CommitEvent) -> None:
        self.tokens += commit.tokens
        self.blocks += 1
        self.steps += commit.steps
        self.thought += commit.thought
        self.answer += commit.text

    def stats(self, finish_reason: str, generated: int, generation: GenerationStats) -> TurnStats:
        """The one place a turn's :class:`TurnStats` is built."""
        return TurnStats(
            prompt_tokens=len(self.target),
            reused=self.reused,
            encoded=len(self.target) - self.reused if self.prompt_in else self.encoded,
            reply_encoded=self.reply_encoded,
            rewound_from=self.rewound,
            generated=generated,
            finish_reason=finish_reason,
            generation=generation,
        )


def format_chat_stats(stats: ChatStats) -> str:
    """A few lines for ``/stats``."""
    lines = [
        f"turns: {stats.turns} · messages: {stats.messages} · cache: {stats.cache_tokens} tokens "
        f"({stats.cache_bytes / 2**20:.1f} MiB) of a {stats.context}-token context"
    ]
    if stats.per_turn:
        lines.append("encoded per turn: " + ", ".join(str(n) for n in stats.encoded_per_turn) + " tokens")
        lines.append(
            "conversation per turn: " + ", ".join(str(t.prompt_tokens) for t in stats.per_turn) + " tokens"
        )
    if stats.last_generation is not None:
        lines.append(format_stats(stats.last_generation))
    return "\n".join(lines)
