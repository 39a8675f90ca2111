"""``dgemma infill`` and ``dgemma edit`` (registered on :data:`dgemma_mlx.cli.app`).

Thin: read the text, call :func:`dgemma_mlx.infill.stream_infill` / :func:`~dgemma_mlx.infill.stream_edit`,
show the passes live (pinned text in its own style), write the result.
"""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console

from .cli import (
    SamplingArgs,
    SystemAlias,
    SystemPrompt,
    app,
    check_utf8,
    checked_system_prompt,
    err,
    open_events,
    sampling_options,
    user_errors,
)
from .errors import DGemmaError


def read_text_arg(text: Optional[str]) -> str:
    """TEXT, stdin for '-' or a pipe, or the file TEXT names when it exists."""
    if text is None or text == "-":
        if text is None and sys.stdin.isatty():
            raise DGemmaError("no text given: pass TEXT or a FILE, or pipe it on stdin")
        return sys.stdin.read()
    try:
        is_file = "\n" not in text and len(text) < 4096 and Path(text).exists()
    except OSError:
        is_file = False
    return read_file(text) if is_file else text


def read_file(path: str) -> str:
    """The file's text, line ends as they are (see :func:`as_lf`)."""
    p = Path(path)
    if p.is_dir():
        raise DGemmaError(f"cannot read '{path}': it is a directory")
    try:
        return p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DGemmaError(f"cannot read '{path}': it is not UTF-8 text")
    except OSError as e:
        raise DGemmaError(f"cannot read '{path}': {e.strerror or e}")


def as_lf(text: str) -> tuple[str, str]:
    """``(text for the model, line end to write back)``: a text whose every line ends in CRLF
    is given to the model with LF and written back with CRLF; any other text goes as it is."""
    if "\r\n" in text and text.count("\r\n") == text.count("\n"):
        return text.replace("\r\n", "\n"), "\r\n"
    return text, "\n"


def with_line_end(text: str, line_end: str) -> str:
    return text if line_end == "\n" else text.replace("\n", line_end)


def render_run(stream: Iterator, tokenizer, events: Optional[str], quiet: bool):
    """Consume an infill/edit event stream: JSON Lines to ``events``, the passes live on a
    terminal, stats on stderr. Returns the final :class:`~dgemma_mlx.infill.InfillEnd`."""
    from .events import PassEvent, event_to_json
    from .infill import InfillEnd
    from .render import LiveView, format_stats

    out = Console(highlight=False)
    # The view gets only the passes: the result is the whole text, written once at the end.
    view = None
    if events != "-" and out.is_terminal and not quiet:
        view = LiveView(tokenizer, out)
    end = None
    with open_events(events) as sink, (view or nullcontext()):
        for event in stream:
            if sink is not None:
                sink.write(json.dumps(event_to_json(event)) + "\n")
                sink.flush()
            if view is not None and isinstance(event, PassEvent):
                view.update(event)
            if isinstance(event, InfillEnd):
                end = event
    if end is not None and not quiet:
        tried = ", ".join(f"{a['fill_length']}: {a['score']:.3f}" for a in end.attempts)
        note = f"score {end.score:.3f}" + (f" (fill length {tried})" if len(end.attempts) > 1 else "")
        err.print(format_stats(end.stats) + "\n" + note, style="dim", soft_wrap=True)
    return end


def write_stdout(text: str) -> None:
    sys.stdout.write(text if text.endswith("\n") or not sys.stdout.isatty() else text + "\n")
    sys.stdout.flush()


def parse_lengths(spec: Optional[str]) -> Optional[list[int]]:
    if spec is None:
        return None
    try:
        values = [int(x) for x in spec.split(",") if x.strip()]
    except ValueError:
        raise DGemmaError(f"--try-lengths takes whole numbers separated by commas (got '{spec}')")
    if not values or any(v <= 0 for v in values):
        raise DGemmaError(f"--try-lengths: every length must be at least 1 token (got '{spec}')")
    return values


@app.command()
@sampling_options(length=False)
@user_errors
def infill(
    text: Optional[str] = typer.Argument(
        None, metavar="TEXT", show_default=False,
        help="Text with holes <|fill|> or <|fill:N|>; an existing path is read as a file; '-' or a pipe: stdin.",
    ),
    fill_length: int = typer.Option(32, "--fill-length", metavar="N", help="Tokens of a <|fill|> hole."),
    try_lengths: Optional[str] = typer.Option(
        None, "--try-lengths", metavar="N,N,...", show_default=False,
        help="Comma-separated lengths to try for <|fill|> holes; keep the best-scoring.",
    ),
    chat: bool = typer.Option(
        False, "--chat/--raw", metavar="", help="Ask through the chat template (instruction-tuned models)."
    ),
    system_prompt: Optional[str] = SystemPrompt,
    system: Optional[str] = SystemAlias,
    *,
    sampling: SamplingArgs,
):
    """Fill the holes in a text; print the whole text, holes filled."""
    from .infill import parse_holes, stream_infill

    overrides = sampling.overrides()
    system_prompt = checked_system_prompt(system_prompt, system, sampling)
    if fill_length <= 0:
        raise DGemmaError(f"--fill-length must be at least 1 token (got {fill_length})")
    lengths = parse_lengths(try_lengths)
    source, line_end = as_lf(read_text_arg(text))
    try:
        parse_holes(source)  # bad holes fail before the model loads
    except DGemmaError as e:
        if text and source == text and not any(c.isspace() for c in text) and "<|" not in text:
            raise DGemmaError(f"{e} (and there is no file '{text}')") from None  # a mistyped path?
        raise
    mdl, tok = sampling.load(sampling.quiet)
    stream = stream_infill(
        mdl, tok, source, fill_length=fill_length, lengths=lengths, chat=chat, system=system_prompt, **overrides
    )
    end = render_run(stream, tok, sampling.events, sampling.quiet)
    if end is not None and sampling.events != "-":
        write_stdout(with_line_end(end.text, line_end))


@app.command()
@sampling_options(length=False)
@user_errors
def edit(
    file: str = typer.Argument(..., metavar="FILE", help="The file to edit."),
    lines: str = typer.Option(..., "--lines", metavar="A-B", help="Lines to rewrite, A-B (1-based, inclusive)."),
    instruction: Optional[str] = typer.Option(
        None, "--instruction", metavar="TEXT", show_default=False,
        help="What to change (through the chat template); without it the lines are re-infilled.",
    ),
    in_place: bool = typer.Option(
        False, "--in-place", "-i", metavar="", help="Replace FILE (atomically) instead of printing."
    ),
    length: Optional[int] = typer.Option(
        None, "--length", metavar="N", show_default=False, help="Tokens of the rewritten lines (default: as now)."
    ),
    system_prompt: Optional[str] = SystemPrompt,
    system: Optional[str] = SystemAlias,
    *,
    sampling: SamplingArgs,
):
    """Rewrite a range of lines of a file, starting from their current text."""
    from .files import atomic_write_text
    from .infill import line_range, stream_edit

    overrides = sampling.overrides()
    system_prompt = checked_system_prompt(system_prompt, system, sampling)
    check_utf8(instruction, "the instruction")
    a, b = line_range(lines)
    source, line_end = as_lf(read_file(file))
    n_lines = len(source.splitlines())
    if b > n_lines:
        raise DGemmaError(f"--lines {a}-{b} is outside '{file}' ({n_lines} lines)")
    if length is not None and length <= 0:
        raise DGemmaError(f"--length must be at least 1 token (got {length})")
    mdl, tok = sampling.load(sampling.quiet)
    stream = stream_edit(
        mdl, tok, source, (a, b), instruction=instruction, length=length, system=system_prompt, **overrides
    )
    end = render_run(stream, tok, sampling.events, sampling.quiet)
    if end is None:
        return
    if in_place:
        atomic_write_text(file, with_line_end(end.text, line_end), what="write")
        if not sampling.quiet:
            err.print(f"Rewrote lines {a}-{b} of {file}", style="dim")
    elif sampling.events != "-":
        write_stdout(with_line_end(end.text, line_end))

