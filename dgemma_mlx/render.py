"""Terminal views of a generation.

* :class:`LiveView` — the live refinement view (Rich). Top to bottom it shows the committed text
  (thought dimmed under a "thinking" label, then the answer) cropped to its last lines, the current
  canvas redrawn in place every pass, and a status line. When the generation ends (or the view is
  closed early, e.g. after Ctrl-C) the live region disappears and the final text is printed once.
* :class:`PlainView` — for a stdout that is not a terminal: writes only the answer text, no
  control codes and no colour.
* :func:`make_view` picks one of the two; :func:`format_stats` formats a run's measurements.

Both views are context managers fed with :mod:`dgemma_mlx.events` through ``update(event)``.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional, TextIO

from rich.color import Color
from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.style import Style
from rich.text import Text

from .channels import ChannelSplitter
from .events import CommitEvent, EndEvent, Event, GenerationStats, PassEvent

__all__ = [
    "ACCEPTED_STYLE",
    "CHANGED_STYLE",
    "PINNED_STYLE",
    "LiveView",
    "PlainView",
    "TokenPieces",
    "format_stats",
    "make_view",
    "noise_style",
]

ACCEPTED_STYLE = Style(bold=True, color="green")
"""Canvas positions whose token was accepted in this pass."""
PINNED_STYLE = Style(color="bright_white", dim=True)
"""Canvas positions pinned by the caller (infilling's fixed text): never change."""
CHANGED_STYLE = Style(underline=True)
"""Added to canvas positions whose token differs from the previous pass of the same block."""
SPECIAL_STYLE = Style(italic=True)
"""Added to special tokens (shown compactly, e.g. ``⟨channel``)."""
THOUGHT_STYLE = Style(dim=True, italic=True)
LABEL_STYLE = Style(dim=True, bold=True)
STATUS_STYLE = Style(color="cyan")

_LOW = (110, 110, 150)  # noisy position with entropy 0: muted blue-grey
_HIGH = (215, 75, 75)  # noisy position with entropy >= _ENTROPY_SCALE: red
_ENTROPY_SCALE = 6.0  # nats
_NOISE_STYLES = [
    Style(color=Color.from_rgb(*(lo + (hi - lo) * k / 7 for lo, hi in zip(_LOW, _HIGH)))) for k in range(8)
]


def noise_style(entropy: float) -> Style:
    """Style of a position that is still noisy: coloured from blue-grey (sure) to red (unsure)."""
    k = int(max(0.0, min(1.0, entropy / _ENTROPY_SCALE)) * 7 + 0.5)
    return _NOISE_STYLES[k]


def _visible(s: str) -> str:
    """Make whitespace/control characters visible on one line: newline → ↵, tab → ⇥."""
    out = []
    for ch in s:
        if ch == "\n":
            out.append("↵")
        elif ch == "\t":
            out.append("⇥")
        elif ch == "\r":
            out.append("␍")
        elif ord(ch) < 32 or ord(ch) == 127:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return "".join(out)


def _compact_special(token: str) -> str:
    """``<|channel>`` → ``⟨channel``, ``<channel|>`` → ``channel⟩``, ``<pad>`` → ``⟨pad⟩``."""
    name = token[1:-1] if token.startswith("<") and token.endswith(">") else token
    opens, closes = name.startswith("|"), name.endswith("|")
    name = name.strip("|")
    if opens and not closes:
        return "⟨" + name
    if closes and not opens:
        return name + "⟩"
    return "⟨" + name + "⟩"


class TokenPieces:
    """Readable text of single token ids, cached per id.

    ``piece(id)`` maps "▁" to a space, a newline to "↵", special tokens to a compact form
    (``⟨channel``); ``byte(id)`` is the byte value of a ``<0xNN>`` byte-fallback token, else None.
    """

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, bool, Optional[int]]] = {}
        special: set[int] = set()
        try:
            special.update(i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False))
        except Exception:
            pass
        try:
            special.update(tokenizer.all_special_ids)
        except Exception:
            pass
        self.special_ids = frozenset(special)

    def _lookup(self, token_id: int) -> tuple[str, bool, Optional[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            try:
                token = self._tokenizer.convert_ids_to_tokens(token_id)
            except Exception:
                token = None
            if token is None:
                hit = (f"⟨?{token_id}⟩", True, None)
            elif token_id in self.special_ids:
                hit = (_compact_special(token), True, None)
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                try:
                    b = int(token[3:5], 16)
                    hit = (_visible(chr(b)) if b < 0x80 else f"‹{b:02X}›", False, b)
                except ValueError:
                    hit = (_visible(token.replace("\u2581", " ")), False, None)
            else:
                hit = (_visible(token.replace("\u2581", " ")), False, None)
            self._cache[token_id] = hit
        return hit

    def piece(self, token_id: int) -> str:
        return self._lookup(token_id)[0]

    def is_special(self, token_id: int) -> bool:
        return self._lookup(token_id)[1]

    def byte(self, token_id: int) -> Optional[int]:
        return self._lookup(token_id)[2]


def _utf8_length(lead: int) -> int:
    if lead < 0x80:
        return 1
    if 0xC2 <= lead <= 0xDF:
        return 2
    if 0xE0 <= lead <= 0xEF:
        return 3
    if 0xF0 <= lead <= 0xF4:
        return 4
    return 0


def canvas_text(event: PassEvent, pieces: TokenPieces, previous: Optional[list[int]] = None) -> Text:
    """The canvas of one pass as styled text, one piece per position.

    Pinned positions get :data:`PINNED_STYLE`, accepted ones :data:`ACCEPTED_STYLE`, the others
    :func:`noise_style` of their entropy;
    positions whose token differs from ``previous`` (the previous pass's canvas) also get
    :data:`CHANGED_STYLE`. A run of byte tokens that forms a whole UTF-8 character is shown as that
    character (styled like its first position, marked changed if any byte changed); a stray
    non-ASCII byte is shown as ``‹NN›``.
    """
    canvas, accepted, entropy = event.canvas, event.accepted, event.entropy
    n = len(canvas)
    text = Text(no_wrap=False, overflow="fold")
    i = 0
    while i < n:
        tid = canvas[i]
        end = i + 1
        b = pieces.byte(tid)
        if b is not None and b >= 0x80:
            length = _utf8_length(b)
            if length > 1 and i + length <= n:
                tail = [pieces.byte(t) for t in canvas[i + 1 : i + length]]
                if all(x is not None and 0x80 <= x <= 0xBF for x in tail):
                    try:
                        display = _visible(bytes([b, *tail]).decode("utf-8"))
                        end = i + length
                    except UnicodeDecodeError:
                        display = pieces.piece(tid)
                else:
                    display = pieces.piece(tid)
            else:
                display = pieces.piece(tid)
        else:
            display = pieces.piece(tid)
        if event.pinned is not None and i < len(event.pinned) and event.pinned[i]:
            style = PINNED_STYLE
        elif i < len(accepted) and accepted[i]:
            style = ACCEPTED_STYLE
        else:
            style = noise_style(entropy[i] if i < len(entropy) else 0.0)
        if pieces.is_special(tid):
            style = style + SPECIAL_STYLE
        if previous is not None and len(previous) == n and previous[i:end] != canvas[i:end]:
            style = style + CHANGED_STYLE
        text.append(display, style)
        i = end
    return text


def status_text(event: Optional[PassEvent], commit: Optional[CommitEvent] = None) -> Text:
    """The status line: block (1-based), step/max, accepted this pass/canvas length, mean entropy,
    tok/s and temperature; after a commit (before the next pass) it names the committed block."""
    if commit is not None:
        s = f"block {commit.block + 1} committed · {len(commit.tokens)} tokens in {commit.steps} passes"
        if event is not None:
            s += f" · {event.tokens_per_second:.1f} tok/s"
    elif event is None:
        s = "prefilling…"
    else:
        s = (
            f"block {event.block + 1} · step {event.step}/{event.max_steps}"
            f" · accepted {event.accepted_count}/{len(event.canvas)}"
            f" · entropy {event.mean_entropy:.3f}"
            f" · {event.tokens_per_second:.1f} tok/s"
            f" · T {event.temperature:.2f}"
        )
    return Text(s, style=STATUS_STYLE, no_wrap=True, overflow="ellipsis")


def committed_text(thought: str, answer: str) -> Text:
    """The committed output: a "thinking" label and the dimmed thought, then the answer."""
    text = Text()
    if thought:
        text.append("thinking\n", LABEL_STYLE)
        text.append(thought.strip("\n"), THOUGHT_STYLE)
        if answer:
            text.append("\n\n")
    text.append(answer.lstrip("\n") if thought else answer)
    return text


class _Transcript:
    """Committed tokens split into thought and answer."""

    def __init__(self, tokenizer, channel_start_id: int, channel_end_id: int):
        self.splitter = ChannelSplitter(tokenizer, channel_start_id, channel_end_id)
        self.count = 0

    def commit(self, tokens: list[int]):
        self.count += len(tokens)
        return self.splitter.feed(tokens)

    def end(self, event: Optional[EndEvent]):
        """Feed what the commits missed (if any) and release held-back text."""
        segments = []
        if event is not None and len(event.tokens) > self.count:
            segments += self.commit(event.tokens[self.count :])
        return segments + self.splitter.flush()


class LiveView:
    """The live refinement view of a generation, on ``rich.live.Live``.

    Usage::

        with LiveView(tokenizer) as view:
            for event in stream_generate(...):
                view.update(event)

    The live region is transient and redrawn on a painter thread as soon as a new pass arrives
    (at most ``refresh_per_second`` frames a second; passes that arrive faster are coalesced into
    the next frame). :meth:`update` only swaps references and wakes the painter, so the generation
    loop never waits on drawing. The region
    never exceeds the terminal height (one line is kept free): top to bottom it shows the committed
    text (thought dimmed under "thinking", then the answer) cropped to its last lines, a rule, the
    current canvas (see :func:`canvas_text`; cropped with "…" if it cannot fit) and the status line
    (see :func:`status_text`). On :class:`EndEvent`, or when the ``with`` block exits early (e.g.
    Ctrl-C), the region disappears and the final text is printed once: the thought dimmed under a
    "thinking" label (only when there was one), then the answer as plain text.
    """

    def __init__(
        self,
        tokenizer,
        console: Optional[Console] = None,
        *,
        refresh_per_second: float = 30.0,
        channel_start_id: int = 100,
        channel_end_id: int = 101,
    ):
        self.console = console if console is not None else Console()
        self._wake = threading.Event()
        self._painter: Optional[threading.Thread] = None
        self.refresh_per_second = refresh_per_second
        self.pieces = TokenPieces(tokenizer)
        self._transcript = _Transcript(tokenizer, channel_start_id, channel_end_id)
        self._committed: tuple[str, str] = ("", "")
        # (pass event, previous canvas of the same block or None); replaced atomically.
        self._pass: Optional[tuple[PassEvent, Optional[list[int]]]] = None
        self._last_pass: Optional[PassEvent] = None
        self._last_commit: Optional[CommitEvent] = None
        self._wrap_cache: tuple = (None, None)
        self._live: Optional[Live] = None
        self._closed = False
        self.end: Optional[EndEvent] = None

    # -- public ----------------------------------------------------------------------------------

    @property
    def thought(self) -> str:
        """Committed thought text so far."""
        return self._committed[0]

    @property
    def answer(self) -> str:
        """Committed answer text so far."""
        return self._committed[1]

    def __enter__(self) -> "LiveView":
        self._live = Live(
            console=self.console,
            get_renderable=lambda: self,
            auto_refresh=False,
            transient=True,
            vertical_overflow="crop",
        )
        self._live.start()
        self._painter = threading.Thread(target=self._paint, name="dgemma-live-view", daemon=True)
        self._painter.start()
        return self

    def _paint(self) -> None:
        interval = 1.0 / self.refresh_per_second
        while True:
            self._wake.wait()
            if self._closed:
                return
            self._wake.clear()
            self._live.refresh()
            time.sleep(interval)

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def update(self, event: Event) -> None:
        """Take the next event of the stream (cheap: drawing happens on Rich's thread)."""
        if isinstance(event, PassEvent):
            cur = self._pass
            previous = cur[0].canvas if cur is not None and cur[0].block == event.block else None
            self._pass = (event, previous)
            self._last_pass = event
            self._last_commit = None
        elif isinstance(event, CommitEvent):
            self._transcript.commit(event.tokens)
            s = self._transcript.splitter
            self._committed = (s.thought, s.answer)
            self._last_commit = event
            self._pass = None
        elif isinstance(event, EndEvent):
            self.end = event
            self.close()
            return
        self._wake.set()

    def close(self) -> None:
        """Remove the live region and print the final text (once; later calls do nothing)."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._painter is not None:
            self._painter.join()
        if self._live is not None:
            self._live.stop()
        self._transcript.end(self.end)
        s = self._transcript.splitter
        self._committed = (s.thought, s.answer)
        thought, answer = s.thought.strip(), s.answer.strip()
        if not (thought or answer) and self.end is not None and not self.end.tokens:
            answer = self.end.text.strip()
        if thought:
            self.console.print(Text("thinking", LABEL_STYLE))
            self.console.print(Text(thought, THOUGHT_STYLE), soft_wrap=True)
            if answer:
                self.console.print()
        if answer:
            self.console.print(Text(answer), soft_wrap=True)

    # -- rendering (Rich's thread) ---------------------------------------------------------------

    def _committed_lines(self, console: Console, width: int):
        committed = self._committed
        key, lines = self._wrap_cache
        if key != (committed, width):
            lines = committed_text(*committed).wrap(console, width) if any(committed) else []
            self._wrap_cache = ((committed, width), lines)
        return lines

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(1, options.max_width)
        budget = max(1, options.size.height - 1)  # lines the region may use
        current, last_pass, last_commit = self._pass, self._last_pass, self._last_commit

        status = status_text(current[0] if current else last_pass, last_commit if current is None else None)
        status.truncate(width, overflow="ellipsis")
        budget -= 1

        canvas_lines = []
        if current is not None and budget > 0:
            canvas_lines = list(canvas_text(current[0], self.pieces, current[1]).wrap(console, width))
            if len(canvas_lines) > budget:
                canvas_lines = canvas_lines[:budget]
                last = canvas_lines[-1].copy()
                last.truncate(max(0, width - 1))
                last.append("…", Style(dim=True))
                canvas_lines[-1] = last
            budget -= len(canvas_lines)

        committed_lines = []
        if budget >= 2 and any(self._committed):
            lines = self._committed_lines(console, width)
            committed_lines = list(lines[-(budget - 1) :])

        for line in committed_lines:
            yield line
        if committed_lines:
            yield Text("─" * width, style=Style(dim=True))
        for line in canvas_lines:
            yield line
        yield status


class PlainView:
    """The view for a stdout that is not a terminal: writes only the answer text.

    Answer text is written (and flushed) as blocks commit, without the thought, control codes or
    colour; leading newlines of the answer are dropped and the output ends with one newline.
    """

    def __init__(
        self,
        tokenizer,
        file: Optional[TextIO] = None,
        *,
        channel_start_id: int = 100,
        channel_end_id: int = 101,
    ):
        self.file = file if file is not None else sys.stdout
        self._transcript = _Transcript(tokenizer, channel_start_id, channel_end_id)
        self._started = False
        self._last = ""
        self._closed = False
        self.end: Optional[EndEvent] = None

    def __enter__(self) -> "PlainView":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def update(self, event: Event) -> None:
        """Write the answer text of a committed block; finish on :class:`EndEvent`."""
        if isinstance(event, CommitEvent):
            self._write(self._transcript.commit(event.tokens))
        elif isinstance(event, EndEvent):
            self.end = event
            self.close()

    def close(self) -> None:
        """Write any remaining answer text and the final newline (once)."""
        if self._closed:
            return
        self._closed = True
        self._write(self._transcript.end(self.end))
        if not self._started and self.end is not None and not self.end.tokens and self.end.text.strip():
            self._write_text(self.end.text.lstrip("\n"))
        if self._started and not self._last.endswith("\n"):
            self._write_text("\n")

    def _write(self, segments) -> None:
        for seg in segments:
            if seg.kind == "answer":
                self._write_text(seg.text if self._started else seg.text.lstrip("\n"))

    def _write_text(self, text: str) -> None:
        if text:
            self._started = True
            self._last = text
            self.file.write(text)
            self.file.flush()


def make_view(tokenizer, console: Optional[Console] = None, *, plain: Optional[bool] = None, **kwargs):
    """A :class:`LiveView` when the console is a terminal (or ``plain=False``), else a
    :class:`PlainView` writing to the console's file."""
    console = console if console is not None else Console()
    if plain is None:
        plain = not console.is_terminal
    if plain:
        return PlainView(tokenizer, console.file, **kwargs)
    return LiveView(tokenizer, console, **kwargs)


def format_stats(stats: GenerationStats) -> str:
    """Two lines for stderr: prompt tokens and prefill speed; generated tokens, blocks, passes,
    tokens per pass, generation speed, time and peak memory."""
    return (
        f"prompt: {stats.prompt_tokens} tokens, {stats.prefill_tps:.1f} tok/s ({stats.prompt_seconds:.2f} s)\n"
        f"generation: {stats.generated_tokens} tokens, {stats.blocks} blocks, {stats.steps} passes, "
        f"{stats.tokens_per_forward:.2f} tok/pass, {stats.generation_tps:.1f} tok/s "
        f"({stats.generation_seconds:.2f} s), peak memory {stats.peak_memory_gb:.2f} GB"
    )
