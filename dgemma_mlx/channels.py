"""Split generated tokens into the model's thought and its answer.

Gemma 4 thinks inside a channel: the model writes ``<|channel>thought\\n ... <channel|>`` and then
the answer. With thinking off the prompt already ends with an empty ``<|channel>thought\\n<channel|>``
so everything generated is answer.

:class:`ChannelSplitter` is fed committed token ids block by block and returns, per feed, the new
text of each channel. Markers, the channel-name line and a UTF-8 character can all fall across a
feed boundary; the splitter holds back what is not yet complete and emits it once it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Optional, Sequence

Kind = Literal["thought", "answer"]

_REPLACEMENT = "\ufffd"
# A channel name longer than this (without a newline) is not a name line: it is treated as thought.
_MAX_NAME_TOKENS = 8


@dataclass(frozen=True)
class Segment:
    """New text of one channel: ``kind`` is ``"thought"`` or ``"answer"``."""

    kind: Kind
    text: str


class ChannelSplitter:
    """Incrementally split committed token ids into thought and answer text.

    ``feed(ids)`` returns the text that became final since the previous feed, as segments in output
    order (consecutive text of one channel is merged). ``thought`` and ``answer`` hold the full text
    emitted so far, so they always equal the concatenation of the returned segments of their kind.

    The marker ids default to the tokenizer's own (:func:`channel_ids`).

    Every ``<|channel>`` section counts as thought (Gemma 4 only uses the ``thought`` channel); its
    first line (the channel name, e.g. ``thought\\n``) is dropped, as is a name that the channel
    closes before its newline. Special tokens are never part of
    the text. Trailing U+FFFD (an incomplete multi-byte character from byte-fallback tokens) is held
    back until the next feed completes it; :meth:`flush` releases whatever is still held back.
    """

    def __init__(self, tokenizer, channel_start_id: Optional[int] = None, channel_end_id: Optional[int] = None):
        self.tokenizer = tokenizer
        start, end = channel_ids(tokenizer)
        self.channel_start_id = start if channel_start_id is None else channel_start_id
        self.channel_end_id = end if channel_end_id is None else channel_end_id
        self.thought = ""
        self.answer = ""
        self._kind: Kind = "answer"
        self._naming = False  # inside "<|channel>" before the end of the name line
        self._name_ids: list[int] = []
        self._ids: list[int] = []  # ids of the current section
        self._skip = 0  # characters of the current section's decoded text that are the name line
        self._emitted = 0  # characters of the current section already emitted

    @property
    def kind(self) -> Kind:
        """The channel the next token belongs to (``"thought"`` while inside a channel)."""
        return "thought" if self._naming else self._kind

    def feed(self, ids: Iterable[int]) -> list[Segment]:
        """Consume committed token ids; return the new text per channel since the last feed."""
        out: list[Segment] = []
        for i in ids:
            i = int(i)
            if i == self.channel_start_id:
                self._close_section(out)
                self._kind = "thought"
                self._naming = True
                self._name_ids = []
            elif i == self.channel_end_id:
                self._close_section(out)
                self._naming = False
                self._kind = "answer"
            elif self._naming:
                self._name_ids.append(i)
                name = self._decode(self._name_ids)
                if "\n" in name:
                    self._start_section(self._name_ids, name.index("\n") + 1)
                elif len(self._name_ids) > _MAX_NAME_TOKENS:
                    self._start_section(self._name_ids, 0)
            else:
                self._ids.append(i)
        self._emit(out, final=False)
        return out

    def flush(self) -> list[Segment]:
        """Emit any held-back text (call at the end of a generation)."""
        out: list[Segment] = []
        self._emit(out, final=True)
        return out

    def commit(self, ids: Iterable[int], final: bool = False) -> tuple[Segment, ...]:
        """:meth:`feed`, then :meth:`flush` when ``final``, as one merged tuple of segments."""
        return merge(self.feed(ids) + (self.flush() if final else []))

    # -- internals -------------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def _start_section(self, ids: list[int], skip: int) -> None:
        self._naming = False
        self._name_ids = []
        self._ids = list(ids)
        self._skip = skip
        self._emitted = 0

    def _close_section(self, out: list[Segment]) -> None:
        # An unfinished name line (``<|channel>thought<channel|>``) is only a name: it is dropped.
        self._emit(out, final=True)
        self._start_section([], 0)

    def _emit(self, out: list[Segment], final: bool) -> None:
        if self._naming or not self._ids:
            return
        text = self._decode(self._ids)[self._skip:]
        if not final:
            text = text.rstrip(_REPLACEMENT)
        new = text[self._emitted:]
        if not new:
            return
        self._emitted += len(new)
        if self._kind == "thought":
            self.thought += new
        else:
            self.answer += new
        if out and out[-1].kind == self._kind:
            out[-1] = Segment(self._kind, out[-1].text + new)
        else:
            out.append(Segment(self._kind, new))


def merge(segments: Iterable[Segment]) -> tuple[Segment, ...]:
    """``segments`` with consecutive text of one channel joined."""
    out: list[Segment] = []
    for seg in segments:
        if out and out[-1].kind == seg.kind:
            out[-1] = Segment(seg.kind, out[-1].text + seg.text)
        elif seg.text:
            out.append(seg)
    return tuple(out)


def text_of(segments: Sequence[Segment], kind: Kind) -> str:
    """The text of one channel in ``segments``."""
    return "".join(s.text for s in segments if s.kind == kind)


def channel_ids(tokenizer) -> tuple[int, int]:
    """Ids of ``<|channel>`` and ``<channel|>`` (Gemma 4's thought markers; 100/101 by default)."""
    ids = []
    for token, default in (("<|channel>", 100), ("<channel|>", 101)):
        try:
            i = tokenizer.convert_tokens_to_ids(token)
        except Exception:
            i = None
        ids.append(i if isinstance(i, int) and i != getattr(tokenizer, "unk_token_id", None) else default)
    return ids[0], ids[1]
