"""Typed events produced by :func:`dgemma_mlx.generate.stream_generate`.

A generation is a sequence of blocks (canvases). Each block is refined by denoising passes and then
committed. The stream is::

    PassEvent*  CommitEvent   (repeated once per block)   EndEvent

All token lists are plain Python ``int`` lists (already on the host), so consumers (the live view,
the JSON Lines writer, the chat REPL) never touch MLX arrays.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Optional, Union


@dataclass(frozen=True)
class PassEvent:
    """One denoising pass over the current canvas.

    Attributes:
        block: 0-based index of the block being denoised.
        step: 1-based pass number within the block (1 .. max_steps).
        max_steps: the maximum number of passes per block.
        temperature: the sampling temperature of this pass (falls linearly t_max -> t_min).
        canvas: argmax token id at every canvas position after this pass (length = canvas length).
        accepted: per position, True when the sampled token was accepted this pass
            (the rest of the canvas was re-noised to uniform-random ids).
        entropy: per-position entropy (nats) of the temperature-scaled distribution.
        mean_entropy: mean of ``entropy``.
        stopped: True when the stable-and-confident criterion ended the block at this pass.
        elapsed: seconds since the generation started (prefill included).
        tokens_per_second: committed tokens so far divided by the time spent generating (0 before
            the first commit).
        pinned: per position, True where the token is pinned (fixed by the caller: always
            accepted, never changed); None when nothing in this block is pinned. ``mean_entropy``
            is then the mean over the free positions only.
        logprob: per position, the log-probability (temperature 1) of the argmax token, when
            the caller asked for scores; else None.
    """

    block: int
    step: int
    max_steps: int
    temperature: float
    canvas: list[int]
    accepted: list[bool]
    entropy: list[float]
    mean_entropy: float
    stopped: bool
    elapsed: float
    tokens_per_second: float = 0.0
    pinned: Optional[list[bool]] = None
    logprob: Optional[list[float]] = None
    type: Literal["pass"] = "pass"

    @property
    def accepted_count(self) -> int:
        return sum(self.accepted)


@dataclass(frozen=True)
class CommitEvent:
    """A block committed to the output.

    Attributes:
        block: 0-based block index.
        tokens: the committed token ids that are part of the output: the argmax canvas cut before
            the first EOS and at ``max_new_tokens``.
        text: the decoded text of ``tokens`` (continuing the text of earlier blocks, so the
            concatenation of all commit texts is the full output).
        steps: denoising passes this block took.
        eos: True when an EOS token ended generation inside this block.
        finished: True when this is the last block (EOS, token budget reached, or cancelled).
        encoded: True when the block was encoded into the prefix cache for the next block.
    """

    block: int
    tokens: list[int]
    text: str
    steps: int
    eos: bool
    finished: bool
    encoded: bool
    type: Literal["commit"] = "commit"


@dataclass(frozen=True)
class GenerationStats:
    """Measurements of one generation.

    ``prefill_tps`` is prompt tokens encoded per second; ``generation_tps`` is generated tokens per
    second of the denoising and block-encoding time; ``tokens_per_forward`` is generated tokens
    (EOS included, as the reference counts them) per denoising pass.
    """

    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    prefill_tps: float = 0.0
    generated_tokens: int = 0
    blocks: int = 0
    steps: int = 0
    tokens_per_forward: float = 0.0
    generation_seconds: float = 0.0
    generation_tps: float = 0.0
    peak_memory_gb: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class EndEvent:
    """The end of a generation.

    Attributes:
        text: the answer: the generated text before the first EOS, without the thought channel.
        tokens: the full list of generated token ids (before the first EOS), thought included.
        finish_reason: ``"eos"`` (an EOS token was committed), ``"length"`` (max_new_tokens reached)
            or ``"cancelled"`` (the consumer stopped the stream).
        stats: measurements of the run.
        thought: the text of the thought channel (empty when thinking was off).
    """

    text: str
    tokens: list[int]
    finish_reason: Literal["eos", "length", "cancelled"]
    stats: GenerationStats = field(default_factory=GenerationStats)
    thought: str = ""
    type: Literal["end"] = "end"


Event = Union[PassEvent, CommitEvent, EndEvent]


def event_to_json(event: Event) -> dict:
    """The JSON-serialisable form of an event (one object per line in ``--events``)."""
    data = asdict(event)
    if isinstance(event, PassEvent):
        data["accepted_count"] = event.accepted_count
        data["entropy"] = [round(e, 6) for e in event.entropy]
        data["mean_entropy"] = round(event.mean_entropy, 8)
        if event.logprob is not None:
            data["logprob"] = [round(x, 6) for x in event.logprob]
    return data
