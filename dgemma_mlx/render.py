"""Terminal views of a generation.

* :class:`LiveView` — the live refinement view (Rich). Top to bottom it shows the committed text
  (thought dimmed under a "thinking" label, then the answer) cropped to its last lines, the current
  canvas redrawn in place every pass, and a status line. When the generation ends (or the view is
  closed early, e.g. after Ctrl-C) the live region disappears and the final text is printed once.
* :class:`PlainView` — for a stdout that is not a terminal: writes only the answer text, no
  control codes and no colour.
* :func:`make_view` picks one of the two; :func:`format_stats` formats a run's measurements.

Both views are context managers fed with :mod:`dgemma_mlx.events` through ``update(event)``; they
read the committed text from the events' typed segments (the generator splits thought from answer)
and draw each canvas with :mod:`dgemma_mlx.canvas`.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional, TextIO

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.style import Style
from rich.text import Text

from .canvas import ACCEPTED_STYLE, CHANGED_STYLE, PINNED_STYLE, TokenPieces, canvas_text, noise_style, terminal_safe
from .channels import Segment
from .events import CommitEvent, EndEvent, Event, GenerationStats, PassEvent

__all__ = [
    "ACCEPTED_STYLE",
    "CHANGED_STYLE",
    "PINNED_STYLE",
    "LiveView",
    "PlainView",
    "TokenPieces",
    "format_memory",
    "format_stats",
    "plural",
    "make_view",
    "noise_style",
]

THOUGHT_STYLE = Style(dim=True, italic=True)
LABEL_STYLE = Style(dim=True, bold=True)
STATUS_STYLE = Style(color="cyan")


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
    """The committed output: a "thinking" label and the dimmed thought, then the answer (control
    characters shown as symbols, see :func:`~dgemma_mlx.canvas.terminal_safe`)."""
    thought, answer = terminal_safe(thought), terminal_safe(answer)
    text = Text()
    if thought:
        text.append("thinking\n", LABEL_STYLE)
        text.append(thought.strip("\n"), THOUGHT_STYLE)
        if answer:
            text.append("\n\n")
    text.append(answer.lstrip("\n") if thought else answer)
    return text


class _Committed:
    """The committed thought and answer, accumulated from the events' typed segments."""

    def __init__(self):
        self.thought = ""
        self.answer = ""

    def add(self, segments: tuple[Segment, ...]) -> None:
        for seg in segments:
            if seg.kind == "thought":
                self.thought += seg.text
            else:
                self.answer += seg.text

    def final(self, end: Optional[EndEvent]) -> tuple[str, str]:
        """``(thought, answer)`` to print last: what was committed, else the end event's text."""
        if (self.thought or self.answer) or end is None:
            return self.thought, self.answer
        return end.thought, end.text


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
    ):
        self.console = console if console is not None else Console()
        self._wake = threading.Event()
        self._painter: Optional[threading.Thread] = None
        self.refresh_per_second = refresh_per_second
        self.pieces = TokenPieces(tokenizer)
        self._transcript = _Committed()
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
            self._transcript.add(event.segments)
            self._committed = (self._transcript.thought, self._transcript.answer)
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
        thought, answer = self._transcript.final(self.end)
        self._committed = (thought, answer)
        thought, answer = terminal_safe(thought.strip()), terminal_safe(answer.strip())
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
    ):
        self.file = file if file is not None else sys.stdout
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
            self._write(event.segments)
        elif isinstance(event, EndEvent):
            self.end = event
            self.close()

    def close(self) -> None:
        """Write any remaining answer text and the final newline (once)."""
        if self._closed:
            return
        self._closed = True
        if not self._started and self.end is not None and self.end.text.strip():
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
    """The one place a view is chosen: a :class:`LiveView` when the console is a terminal (and
    ``plain`` is not True), else a :class:`PlainView` writing to the console's file."""
    console = console if console is not None else Console()
    if plain is None:
        plain = not console.is_terminal
    if plain:
        return PlainView(tokenizer, console.file)
    return LiveView(tokenizer, console, **kwargs)


def plural(n: int, one: str, many: Optional[str] = None) -> str:
    """``"1 block"``, ``"2 blocks"``."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def format_memory(gigabytes: float) -> str:
    """``"512 MB"`` below 1 GB, else ``"17.92 GB"``."""
    return f"{gigabytes * 1000:.0f} MB" if gigabytes < 1 else f"{gigabytes:.2f} GB"


def format_stats(stats: GenerationStats) -> str:
    """Two lines for stderr: prompt tokens and prefill speed; generated tokens, blocks, passes,
    tokens per pass, generation speed, time and peak memory."""
    return (
        f"prompt: {plural(stats.prompt_tokens, 'token')}, {stats.prefill_tps:.1f} tok/s ({stats.prompt_seconds:.2f} s)\n"
        f"generation: {plural(stats.generated_tokens, 'token')}, {plural(stats.blocks, 'block')}, "
        f"{plural(stats.steps, 'pass', 'passes')}, {stats.tokens_per_forward:.2f} tok/pass, "
        f"{stats.generation_tps:.1f} tok/s ({stats.generation_seconds:.2f} s), "
        f"peak memory {format_memory(stats.peak_memory_gb)}"
    )
