"""``dgemma sudoku`` (solve a puzzle with the givens pinned, watching the board converge) and
``dgemma models`` (the bundled models and the Hugging Face cache's DiffusionGemma checkpoints)."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from rich.console import Console
from rich.text import Text

from .cli import Adapter, SamplingArgs, Seed, Steps, app, err, user_errors
from .errors import DGemmaError

NOT_SOLVED = 3  # exit status when the final board is not a valid solution


def board_text(digits: list[int], given: list[bool], accepted: list[bool], entropy: list[float]) -> Text:
    """A 9x9 board: givens bold cyan, accepted cells bold green, the rest coloured by entropy
    (yellow when nearly decided, red when uncertain); '·' where the canvas holds no digit."""
    out = Text()
    for r in range(9):
        if r and r % 3 == 0:
            out.append("──────┼───────┼──────\n", style="dim")
        for c in range(9):
            i = r * 9 + c
            if c and c % 3 == 0:
                out.append("│ ", style="dim")
            d = digits[i]
            if given[i]:
                style = "bold cyan"
            elif accepted[i]:
                style = "bold green"
            else:
                style = "yellow" if entropy[i] < 0.5 else "red" if entropy[i] > 1.5 else "dark_orange"
            out.append(str(d) if d else "·", style=style)
            out.append(" ")
        out.append("\n")
    return out


@app.command()
@user_errors
def sudoku(
    puzzle: Optional[str] = typer.Argument(
        None, metavar="PUZZLE", show_default=False, help="81 characters, digits with 0 or '.' for blanks ('-': stdin)."
    ),
    model: str = typer.Option(
        "sudoku", "--model", "-m", metavar="PATH",
        help="A Sudoku model: the bundled one, or a checkpoint recipes/sudoku trained.",
    ),
    adapter: Optional[str] = Adapter,
    random_puzzle: bool = typer.Option(False, "--random", metavar="", help="Solve a random puzzle with a unique solution."),
    givens: Optional[int] = typer.Option(
        None, "--givens", metavar="N", show_default=False,
        help="Givens of the --random puzzle (22-81, default 35; below 24 it can take seconds to make).",
    ),
    seed: Optional[int] = Seed,
    steps: Optional[int] = Steps,
):
    """Solve a Sudoku by infilling: the givens are pinned, the board converges pass by pass."""
    import random as _random

    from rich.live import Live

    from . import sudoku as sd
    from .events import EndEvent, PassEvent

    sampling = SamplingArgs(model=model, adapter=adapter, seed=seed, steps=steps)
    overrides = sampling.overrides()
    if random_puzzle:
        if puzzle is not None:
            raise DGemmaError("give a PUZZLE or --random, not both")
        board, _ = sd.make_puzzle(_random.Random(None if seed == -1 else seed), 35 if givens is None else givens)
    else:
        if givens is not None:
            raise DGemmaError("--givens is for --random puzzles (a given PUZZLE has its own)")
        if puzzle is None or puzzle == "-":
            if puzzle is None and sys.stdin.isatty():
                raise DGemmaError("no puzzle given: pass PUZZLE (81 characters), pipe it on stdin, or use --random")
            puzzle = sys.stdin.read()
        board = sd.parse_board(puzzle)
    mdl, tok = sampling.load()
    sd.check_model(mdl)
    out = Console(highlight=False)
    given = [d != 0 for d in board]
    live = Live(console=out, auto_refresh=False, transient=False) if out.is_terminal else None
    end = None
    steps_taken = 0
    with live or _Null():
        for event in sd.stream_solve(mdl, tok, board, **overrides):
            if isinstance(event, PassEvent) and live is not None:
                digits = sd.decode(event.canvas)
                view = board_text(digits, given, event.accepted, event.entropy)
                view.append(
                    f"pass {event.step}/{event.max_steps}  accepted {sum(event.accepted)}/81  "
                    f"mean entropy {event.mean_entropy:.3f}", style="dim",
                )
                live.update(view, refresh=True)
            if isinstance(event, PassEvent):
                steps_taken = event.step
            if isinstance(event, EndEvent):
                end = event
    solved = sd.decode(end.tokens)
    valid = sd.is_solution(solved, board)
    if live is None:
        print(sd.format_board(solved))
    err.print(
        f"{'solved' if valid else 'NOT a valid solution'} in {steps_taken} pass{'' if steps_taken == 1 else 'es'} "
        f"({end.stats.generation_seconds:.2f} s)", style="green" if valid else "red", highlight=False,
    )
    if not valid:
        raise typer.Exit(NOT_SOLVED)


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@app.command()
@user_errors
def models():
    """List the bundled models and the DiffusionGemma checkpoints in the Hugging Face cache."""
    from .bundled import list_models

    out = Console(highlight=False)
    entries = list_models()
    if not entries:
        out.print("No models: the bundled ones are missing and the Hugging Face cache has no DiffusionGemma checkpoint.")
        return
    for e in entries:
        size = f"{e.size_bytes / 2**20:.1f} MB" if e.size_bytes < 2**30 else f"{e.size_bytes / 2**30:.1f} GB"
        out.print(f"[bold]{e.name}[/bold]  [dim]{e.source}, {size}[/dim]\n  {e.description}", soft_wrap=True)
    if all(e.source == "bundled" for e in entries):
        out.print("[dim](no DiffusionGemma checkpoint in the Hugging Face cache)[/dim]", soft_wrap=True)
