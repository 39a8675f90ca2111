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
    EntropyBound,
    ModelOpt,
    Seed,
    Steps,
    System,
    TMax,
    TMin,
    app,
    check_overrides,
    default_model,
    err,
    load_with_status,
    open_events,
    sampling_overrides,
    user_errors,
)
from .errors import DGemmaError

Events = typer.Option(None, "--events", help="Write every pass and commit as JSON Lines to FILE ('-': stdout).")
Quiet = typer.Option(False, "--quiet", "-q", help="No live view and no stats: just the result.")


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
    p = Path(path)
    if p.is_dir():
        raise DGemmaError(f"cannot read '{path}': it is a directory")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DGemmaError(f"cannot read '{path}': it is not UTF-8 text")
    except OSError as e:
        raise DGemmaError(f"cannot read '{path}': {e.strerror or e}")


def render_run(stream: Iterator, tokenizer, events: Optional[str], quiet: bool):
    """Consume an infill/edit event stream: JSON Lines to ``events``, the passes live on a
    terminal, stats on stderr. Returns the final :class:`~dgemma_mlx.infill.InfillEnd`."""
    from .channels import channel_ids
    from .events import PassEvent, event_to_json
    from .infill import InfillEnd
    from .render import LiveView, format_stats

    out = Console(highlight=False)
    # The view gets only the passes: the result is the whole text, written once at the end.
    view = None
    if events != "-" and out.is_terminal and not quiet:
        start, end_id = channel_ids(tokenizer)
        view = LiveView(tokenizer, out, channel_start_id=start, channel_end_id=end_id)
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
@user_errors
def infill(
    text: Optional[str] = typer.Argument(
        None, help="Text with holes <|fill|> or <|fill:N|>; an existing path is read as a file; '-' or a pipe: stdin."
    ),
    model: Optional[str] = ModelOpt,
    fill_length: int = typer.Option(32, "--fill-length", help="Tokens of a <|fill|> hole."),
    try_lengths: Optional[str] = typer.Option(
        None, "--try-lengths", help="Comma-separated lengths to try for <|fill|> holes; keep the best-scoring."
    ),
    chat: bool = typer.Option(False, "--chat/--raw", help="Ask through the chat template (instruction-tuned models)."),
    steps: Optional[int] = Steps,
    entropy_bound: Optional[float] = EntropyBound,
    t_min: Optional[float] = TMin,
    t_max: Optional[float] = TMax,
    seed: Optional[int] = Seed,
    system: Optional[str] = System,
    events: Optional[str] = Events,
    quiet: bool = Quiet,
):
    """Fill the holes in a text; print the whole text, holes filled."""
    from .infill import parse_holes, stream_infill

    overrides = sampling_overrides(steps=steps, entropy_bound=entropy_bound, t_min=t_min, t_max=t_max, seed=seed)
    check_overrides(overrides)
    if fill_length <= 0:
        raise DGemmaError(f"--fill-length must be at least 1 token (got {fill_length})")
    lengths = parse_lengths(try_lengths)
    source = read_text_arg(text)
    parse_holes(source)  # bad holes fail before the model loads
    mdl, tok = load_with_status(model or default_model(), quiet)
    stream = stream_infill(mdl, tok, source, fill_length=fill_length, lengths=lengths, chat=chat, system=system,
                           **overrides)
    end = render_run(stream, tok, events, quiet)
    if end is not None and events != "-":
        write_stdout(end.text)


@app.command()
@user_errors
def edit(
    file: str = typer.Argument(..., help="The file to edit."),
    lines: str = typer.Option(..., "--lines", help="Lines to rewrite, A-B (1-based, inclusive)."),
    instruction: Optional[str] = typer.Option(
        None, "--instruction", help="What to change (through the chat template); without it the lines are re-infilled."
    ),
    in_place: bool = typer.Option(False, "--in-place", "-i", help="Replace FILE (atomically) instead of printing."),
    length: Optional[int] = typer.Option(None, "--length", help="Tokens of the rewritten lines (default: as now)."),
    model: Optional[str] = ModelOpt,
    steps: Optional[int] = Steps,
    entropy_bound: Optional[float] = EntropyBound,
    t_min: Optional[float] = TMin,
    t_max: Optional[float] = TMax,
    seed: Optional[int] = Seed,
    system: Optional[str] = System,
    events: Optional[str] = Events,
    quiet: bool = Quiet,
):
    """Rewrite a range of lines of a file, starting from their current text."""
    from .files import atomic_write_text
    from .infill import line_range, stream_edit

    overrides = sampling_overrides(steps=steps, entropy_bound=entropy_bound, t_min=t_min, t_max=t_max, seed=seed)
    check_overrides(overrides)
    a, b = line_range(lines)
    source = read_file(file)
    n_lines = len(source.splitlines())
    if b > n_lines:
        raise DGemmaError(f"--lines {a}-{b} is outside '{file}' ({n_lines} lines)")
    if length is not None and length <= 0:
        raise DGemmaError(f"--length must be at least 1 token (got {length})")
    mdl, tok = load_with_status(model or default_model(), quiet)
    stream = stream_edit(mdl, tok, source, (a, b), instruction=instruction, length=length, system=system, **overrides)
    end = render_run(stream, tok, events, quiet)
    if end is None:
        return
    if in_place:
        atomic_write_text(file, end.text, what="write")
        if not quiet:
            err.print(f"Rewrote lines {a}-{b} of {file}", style="dim")
    elif events != "-":
        write_stdout(end.text)
