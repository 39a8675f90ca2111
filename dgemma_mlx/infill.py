"""Infilling and editing: write into holes of fixed text.

Holes are written ``<|fill|>`` (``fill_length`` tokens) or ``<|fill:N|>`` (``N`` tokens). The text
before the first hole is the context (the prompt, encoded into the cache). The canvas starts at
the first hole: each hole's positions are free, the text between and after the holes is pinned
(see :func:`dgemma_mlx.generate.stream_generate`), and after the last piece of text the end of
the text is pinned (the end token, then EOS fill up to the block's end, as the model was trained
to see a finished response; the end token is EOS in raw mode, Gemma 4's end of turn ``<turn|>`` in
chat mode when the vocabulary has it). A canvas too long for one block continues in the next; each block
is denoised after the previous one is committed, so a hole sees the text after it only within
its own block.

Modes: raw (the context is plain text after BOS), or ``chat=True`` for instruction-tuned
checkpoints: the user turn shows the text with its gaps and asks for it back, filled; the model's
reply is the same canvas, after the context.

A hole's fill is its tokens up to the first end-of-sequence token in it (so the model may leave
part of a hole empty), decoded without special tokens.

The **score** of a run is the mean, over all hole positions, of the log-probability at
temperature 1 of the chosen token under the final pass of its block. With ``lengths``, the
default-length holes are tried at each length and the best-scoring run is kept.

:func:`stream_edit` rewrites a range of lines: one hole over the range, warm-started from its
current tokens, the rest of the text pinned (optionally with an instruction, in chat mode).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Optional, Sequence

from .errors import DGemmaError
from .events import EndEvent, Event, PassEvent
from .generate import render_chat, stream_generate

DEFAULT_FILL_LENGTH = 32
HOLE = re.compile(r"<\|fill(?::(.*?))?\|>")
GAP = "[___]"  # how a hole is shown to a chat model

INFILL_REQUEST = (
    "The text below has gaps, each marked {gap}. Reply with the whole text exactly as it is, "
    "each gap filled in, and nothing else.\n\n{text}"
)
EDIT_REQUEST = (
    "Rewrite the part of the text below between {open} and {close}: {instruction}\n"
    "Reply with the whole text, that part rewritten, and nothing else.\n\n{text}"
)


@dataclass(frozen=True)
class InfillPlan:
    """What one infill run generates.

    ``prompt`` is the context's token ids; ``pinned`` / ``warm_start`` give per generated position
    (all ``max_new_tokens`` of them, whole blocks) the fixed / first token or -1; ``holes`` are
    the (start, end) generated positions of each hole; ``pieces`` the texts around the holes
    (``len(holes) + 1``, the first one being the context).
    """

    prompt: list[int]
    pinned: list[int]
    warm_start: Optional[list[int]]
    holes: list[tuple[int, int]]
    pieces: list[str]
    max_new_tokens: int


@dataclass(frozen=True)
class InfillEnd(EndEvent):
    """The last event of :func:`stream_infill`: ``text`` is the whole text with the holes
    filled; ``fills`` the text of each hole; ``score`` the run's score (see the module
    docstring); ``fill_length`` the length used for ``<|fill|>`` holes; ``attempts`` one
    ``{"fill_length", "score", "passes"}`` per length tried."""

    fills: list[str] = field(default_factory=list)
    score: float = 0.0
    fill_length: Optional[int] = None
    attempts: list[dict] = field(default_factory=list)


def parse_holes(text: str) -> tuple[list[str], list[Optional[int]]]:
    """Split ``text`` at its holes: the texts around them (one more than the holes) and each
    hole's length (None for ``<|fill|>``). Raises a one-line error for text without a hole or a
    hole length that is not a whole number >= 1."""
    pieces, lengths, last = [], [], 0
    for m in HOLE.finditer(text):
        pieces.append(text[last : m.start()])
        spec = m.group(1)
        if spec is None:
            lengths.append(None)
        else:
            try:
                n = int(spec.strip())
            except ValueError:
                raise DGemmaError(f"hole {m.group(0)}: the length must be a whole number of tokens")
            if n <= 0:
                raise DGemmaError(f"hole {m.group(0)}: the length must be at least 1 token")
            lengths.append(n)
        last = m.end()
    if not lengths:
        raise DGemmaError("the text has no hole: mark one with <|fill|> or <|fill:N|>")
    pieces.append(text[last:])
    return pieces, lengths


def plan_infill(
    model,
    tokenizer,
    pieces: Sequence[str],
    lengths: Sequence[int],
    *,
    chat: bool = False,
    system: Optional[str] = None,
    request: Optional[str] = None,
    warm: Optional[Sequence[Optional[Sequence[int]]]] = None,
) -> InfillPlan:
    """The plan for holes of ``lengths`` between ``pieces`` (see :class:`InfillPlan`).

    ``request`` is the chat user turn (chat mode; default: :data:`INFILL_REQUEST` for the text
    with gaps); ``warm`` optionally gives per hole the tokens to warm-start it with.
    """
    C, context = model.args.canvas_length, model.args.max_position_embeddings
    words = lambda s: list(tokenizer.encode(s, add_special_tokens=False)) if s else []  # noqa: E731
    if chat:
        if request is None:
            request = INFILL_REQUEST.format(gap=GAP, text=GAP.join(pieces))
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": request}]
        prompt = render_chat(tokenizer, messages, think=False) + words(pieces[0])
        end = _token_id(tokenizer, "<turn|>")
    else:
        prompt = list(tokenizer.encode(pieces[0])) if pieces[0] else _bos(tokenizer)
        end = None
    eos = _eos(model, tokenizer)
    pinned: list[int] = []
    warm_start: list[int] = []
    holes = []
    for k, (n, piece) in enumerate(zip(lengths, pieces[1:])):
        holes.append((len(pinned), len(pinned) + n))
        seed = list(warm[k] or []) if warm is not None else []
        warm_start += (seed + [-1] * n)[:n]
        pinned += [-1] * n
        text = words(piece)
        pinned += text
        warm_start += [-1] * len(text)
    tail = [end if end is not None else eos] if len(pinned) % C else []
    pinned += tail
    pinned += [eos] * (-len(pinned) % C)
    if len(prompt) + len(pinned) > context:
        raise DGemmaError(
            f"the text with its holes needs {len(prompt) + len(pinned)} tokens ({len(prompt)} of context, "
            f"{len(pinned)} on the canvas), more than the model's context of {context} tokens"
        )
    warm_start += [-1] * (len(pinned) - len(warm_start))
    return InfillPlan(
        prompt=prompt,
        pinned=pinned,
        warm_start=warm_start if any(t >= 0 for t in warm_start) else None,
        holes=holes,
        pieces=list(pieces),
        max_new_tokens=len(pinned),
    )


def run_plan(model, tokenizer, plan: InfillPlan, **settings: Any) -> Iterator[Event]:
    """Generate ``plan``: the events of :func:`stream_generate` (with scores), ending with an
    :class:`InfillEnd` for the filled text."""
    last: dict[int, PassEvent] = {}
    end = None
    for event in stream_generate(
        model,
        tokenizer,
        plan.prompt,
        pinned=plan.pinned,
        warm_start=plan.warm_start,
        stop_at_eos=False,
        score=True,
        **{**settings, "max_new_tokens": plan.max_new_tokens},
    ):
        if isinstance(event, PassEvent):
            last[event.block] = event
        if isinstance(event, EndEvent):
            end = event
        else:
            yield event
    tokens = [t for b in sorted(last) for t in last[b].canvas]
    logprob = [x for b in sorted(last) for x in last[b].logprob]
    eos = set(model.args.eos_token_ids)
    fills, scores = [], []
    for a, b in plan.holes:
        ids = tokens[a:b]
        cut = next((i for i, t in enumerate(ids) if t in eos), len(ids))
        fills.append(tokenizer.decode(ids[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False))
        scores += logprob[a:b]
    text = plan.pieces[0] + "".join(f + p for f, p in zip(fills, plan.pieces[1:]))
    yield InfillEnd(
        text=text,
        tokens=tokens,
        finish_reason=end.finish_reason,
        stats=end.stats,
        thought="",
        fills=fills,
        score=sum(scores) / len(scores),
    )


def stream_infill(
    model,
    tokenizer,
    text: str,
    *,
    fill_length: int = DEFAULT_FILL_LENGTH,
    lengths: Optional[Sequence[int]] = None,
    chat: bool = False,
    system: Optional[str] = None,
    **settings: Any,
) -> Iterator[Event]:
    """Fill the holes of ``text``; yield the events of each run (:class:`PassEvent`,
    :class:`CommitEvent`) and finally an :class:`InfillEnd` whose ``text`` is the whole text with
    the holes filled.

    Args:
        fill_length: tokens of a ``<|fill|>`` hole.
        lengths: try these lengths for the ``<|fill|>`` holes (one run each) and keep the run with
            the best score.
        chat: chat-template mode (instruction-tuned checkpoints).
        settings: generation settings (``seed``, ``steps``, ...; see
            :class:`~dgemma_mlx.generate.GenerationSettings`).
    """
    pieces, holes = parse_holes(text)
    candidates = list(lengths) if lengths else [fill_length]
    for n in candidates:
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise DGemmaError(f"the fill length must be at least 1 token (got {n!r})")
    if len(candidates) > 1 and all(h is not None for h in holes):
        raise DGemmaError("trying several lengths needs a <|fill|> hole (<|fill:N|> holes have their own length)")
    plans = [plan_infill(model, tokenizer, pieces, [n if h is None else h for h in holes], chat=chat, system=system)
             for n in candidates]
    best, attempts = None, []
    for n, plan in zip(candidates, plans):
        for event in run_plan(model, tokenizer, plan, **settings):
            if isinstance(event, InfillEnd):
                attempts.append({"fill_length": n, "score": event.score, "passes": event.stats.steps})
                if best is None or event.score > best[1].score:
                    best = (n, event)
            else:
                yield event
    yield replace(best[1], fill_length=best[0], attempts=attempts)


def infill(model, tokenizer, text: str, **kwargs: Any) -> InfillEnd:
    """Run :func:`stream_infill` to the end and return its :class:`InfillEnd`."""
    end = None
    for end in stream_infill(model, tokenizer, text, **kwargs):
        pass
    return end


def line_range(spec: str) -> tuple[int, int]:
    """``"A-B"`` (or ``"A"``) -> (A, B), 1-based and inclusive."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", spec or "")
    if not m:
        raise DGemmaError(f"--lines must look like A-B (got '{spec}')")
    a = int(m.group(1))
    b = int(m.group(2)) if m.group(2) else a
    if a < 1 or b < a:
        raise DGemmaError(f"--lines {spec}: need 1 <= A <= B")
    return a, b


def stream_edit(
    model,
    tokenizer,
    text: str,
    lines: tuple[int, int],
    *,
    instruction: Optional[str] = None,
    length: Optional[int] = None,
    system: Optional[str] = None,
    warm: bool = True,
    **settings: Any,
) -> Iterator[Event]:
    """Rewrite lines ``lines`` = (A, B) (1-based, inclusive) of ``text``: one hole over them
    (their final line break stays pinned), warm-started from their current tokens; the rest of
    the text is pinned. With an ``instruction`` the chat template asks for that change. ``length``
    sets the hole's tokens (default: as many as the lines have now). ``warm=False`` starts the
    hole from noise instead (to measure what the warm start saves). Yields like
    :func:`stream_infill`; the :class:`InfillEnd`'s ``text`` is the whole edited text."""
    all_lines = text.splitlines(keepends=True)
    a, b = lines
    if not 1 <= a <= b <= len(all_lines):
        raise DGemmaError(f"--lines {a}-{b} is outside the text ({len(all_lines)} lines)")
    region = "".join(all_lines[a - 1 : b])
    body = region.rstrip("\r\n")
    before, after = "".join(all_lines[: a - 1]), region[len(body) :] + "".join(all_lines[b:])
    current = list(tokenizer.encode(body, add_special_tokens=False)) if body else []
    n = length if length is not None else max(len(current), 1)
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise DGemmaError(f"the edit length must be at least 1 token (got {n!r})")
    request = None
    if instruction is not None:
        if not instruction.strip():
            raise DGemmaError("the instruction is empty")
        request = EDIT_REQUEST.format(
            open="<<<", close=">>>", instruction=instruction.strip(), text=f"{before}<<<{body}>>>{after}"
        )
    plan = plan_infill(model, tokenizer, [before, after], [n], chat=instruction is not None, system=system,
                       request=request, warm=[current] if warm else None)
    for event in run_plan(model, tokenizer, plan, **settings):
        yield replace(event, fill_length=n) if isinstance(event, InfillEnd) else event


def edit(model, tokenizer, text: str, lines: tuple[int, int], **kwargs: Any) -> InfillEnd:
    """Run :func:`stream_edit` to the end and return its :class:`InfillEnd`."""
    end = None
    for end in stream_edit(model, tokenizer, text, lines, **kwargs):
        pass
    return end


def _bos(tokenizer) -> list[int]:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise DGemmaError("the text starts with a hole and the tokenizer has no BOS token to start from")
    return [bos]


def _eos(model, tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    return eos if eos is not None else model.args.eos_token_ids[0]


def _token_id(tokenizer, token: str) -> Optional[int]:
    # The id of a special token such as the end-of-turn marker, or None when the vocabulary lacks it.
    try:
        ids = tokenizer.convert_tokens_to_ids([token])
    except Exception:
        return None
    unk = getattr(tokenizer, "unk_token_id", None)
    return ids[0] if ids and ids[0] is not None and ids[0] != unk else None
