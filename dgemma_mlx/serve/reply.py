"""From generation events to the text a client receives.

:class:`Reply` is fed the events of one generation (on the worker thread) and returns what to send:
text deltas per committed block (chat: the answer as ``content`` and the thought as
``reasoning_content``; completions: the text), a draft per pass, and the finish reason. Stop
strings end the answer; :class:`StopFilter` finds them even when they straddle two blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

from ..channels import ChannelSplitter, channel_ids
from ..events import CommitEvent, EndEvent, PassEvent

FINISH_REASONS = {"eos": "stop", "length": "length"}


class StopFilter:
    """Cut a text fed piece by piece at the first occurrence of any stop string.

    ``feed`` returns the part of the text that is final: text that could be the beginning of a
    stop string is held back until the next piece decides it (``final=True`` releases it).
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.stopped = False
        self._pending = ""

    def feed(self, text: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        buf = self._pending + text
        self._pending = ""
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            return buf[: min(hits)]
        if final or not self.stops:
            return buf
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:n]):
                    hold = n
                    break
        self._pending = buf[len(buf) - hold :]
        return buf[: len(buf) - hold]


@dataclass
class Delta:
    """What one event adds to the response.

    Attributes:
        pieces: ``(field, text)`` in output order, field ``"content"`` or ``"reasoning_content"``.
        draft: the draft of a pass (``include_drafts``), else None.
        finish_reason: set on the last delta of the reply (``"stop"`` or ``"length"``).
    """

    pieces: list[tuple[str, str]] = field(default_factory=list)
    draft: Optional[dict] = None
    finish_reason: Optional[str] = None


class Reply:
    """The reply under construction (used on the worker thread only).

    Args:
        tokenizer: decodes the committed tokens and the drafts.
        chat: split the thought from the answer (chat); else the text is one piece (completions).
        stops: stop strings (applied to the answer).
        eos_ids: the model's EOS ids (a draft is cut at the first one).
        fill: for infilling, the generated positions ``(start, end)`` of the hole: the answer is
            the hole's fill (sent whole when the run ends), drafts show the hole only.
    """

    def __init__(
        self, tokenizer, *, chat: bool, stops: list[str], eos_ids: Iterable[int] = (),
        fill: Optional[tuple[int, int]] = None,
    ):
        self.tokenizer = tokenizer
        self.fill = fill
        self.eos_ids = set(int(i) for i in eos_ids)
        self.chat = chat
        self.splitter = ChannelSplitter(tokenizer, *channel_ids(tokenizer)) if chat else None
        self.filter = StopFilter(stops)
        self.content = ""
        self.reasoning = ""
        self.completion_tokens = 0
        self.passes = 0
        self.blocks = 0
        self.finish_reason: Optional[str] = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def draft(self, event: PassEvent) -> Delta:
        """The canvas of a pass as text (cut at the first EOS, as a commit would be)."""
        canvas = event.canvas
        length = len(canvas)
        if self.fill is not None:  # the part of the hole in this block
            offset = event.block * len(canvas)
            canvas = canvas[max(self.fill[0] - offset, 0) : max(self.fill[1] - offset, 0)]
        text = self._decode(canvas)
        return Delta(
            draft={
                "block": event.block,
                "step": event.step,
                "max_steps": event.max_steps,
                "text": text,
                "accepted": event.accepted_count,
                "canvas_length": length,
                "mean_entropy": round(event.mean_entropy, 6),
                "temperature": round(event.temperature, 6),
                "stopped": event.stopped,
            }
        )

    def commit(self, event: CommitEvent) -> Delta:
        if self.done:  # a stop string ended the reply; the worker has not stopped yet
            return Delta()
        self.passes += event.steps
        self.blocks += 1
        if self.fill is not None:
            return Delta()  # the fill is known at the end
        self.completion_tokens += len(event.tokens)
        if self.splitter is not None:
            segments = [(s.kind, s.text) for s in self.splitter.feed(event.tokens)]
            if event.finished:
                segments += [(s.kind, s.text) for s in self.splitter.flush()]
        else:
            segments = [("answer", event.text)]
        delta = Delta()
        for kind, text in segments:
            if kind == "thought":
                self._add(delta, "reasoning_content", text)
            elif not self.filter.stopped:
                self._add(delta, "content", self.filter.feed(text, final=event.finished))
        if self.filter.stopped:
            delta.finish_reason = self.finish_reason = "stop"
        elif event.finished:
            self._add(delta, "content", self.filter.feed("", final=True))
        return delta

    def end(self, event: EndEvent) -> Delta:
        """The last delta: anything still held back, and the finish reason."""
        delta = Delta()
        if self.fill is not None:
            hole = event.tokens[self.fill[0] : self.fill[1]]
            self.completion_tokens = next((i for i, t in enumerate(hole) if t in self.eos_ids), len(hole))
            fills = getattr(event, "fills", None) or [self._decode(hole)]
            self._add(delta, "content", self.filter.feed(fills[0], final=True))
            # The model ends a fill early with EOS ("stop"); a hole filled to its end is "length".
            full = self.completion_tokens == len(hole) and not self.filter.stopped
            self.finish_reason = "length" if full else "stop"
        if not self.done:
            self._add(delta, "content", self.filter.feed("", final=True))
            self.finish_reason = FINISH_REASONS.get(event.finish_reason, "stop")
        delta.finish_reason = self.finish_reason
        return delta

    def _decode(self, ids: list[int]) -> str:
        """``ids`` up to the first EOS, as text."""
        cut = next((i for i, t in enumerate(ids) if t in self.eos_ids), len(ids))
        return self.tokenizer.decode(ids[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _add(self, delta: Delta, name: str, text: str) -> None:
        if not text:
            return
        if name == "content":
            self.content += text
        else:
            self.reasoning += text
        if delta.pieces and delta.pieces[-1][0] == name:
            delta.pieces[-1] = (name, delta.pieces[-1][1] + text)
        else:
            delta.pieces.append((name, text))
