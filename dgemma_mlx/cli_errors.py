"""How the command line reports problems: one line on stderr, never a traceback.

:func:`run_app` runs the Typer app without its own error handling: usage errors become one line
(an unknown option names the option the user probably meant, including the names other tools
use), a bug becomes one line asking to report it (``DGEMMA_DEBUG=1`` shows the traceback).
:func:`quiet_third_party` keeps other libraries' warnings off the user's terminal.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from typing import Any, Optional, Sequence

import typer
from rich.console import Console

try:  # Typer >= 0.29 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

err = Console(stderr=True, highlight=False)

# What other tools (mlx-lm, llama.cpp, transformers) call an option -> what to use here.
SIMILAR_OPTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    # another tool's option -> candidates (ours, a note): the first the command has is suggested
    "--temperature": (("--temp", "or --t-min/--t-max for a falling schedule"),),
    "--tmp": (("--temp", ""),),
    "--t": (("--temp", ""),),
    "--max-length": (("--max-tokens", ""),),
    "--max-new": (("--max-tokens", ""),),
    "--num-tokens": (("--max-tokens", ""),),
    "--n-predict": (("--max-tokens", ""),),
    "--tokens": (("--max-tokens", ""),),
    "--length": (("--max-tokens", ""), ("--fill-length", "")),
    "--denoising-steps": (("--steps", ""),),
    "--max-denoising-steps": (("--steps", ""),),
    "--num-steps": (("--steps", ""),),
    "--system-message": (("--system-prompt", ""),),
    "--model-path": (("--model", ""),),
    "--model-dir": (("--model", ""),),
    "--random-seed": (("--seed", ""),),
    "--top-p": (("--entropy-bound", "the entropy-bound sampler has no top-p"),),
    "--min-p": (("--entropy-bound", "the entropy-bound sampler has no min-p"),),
    "--output": (("--events", "or a redirect (> FILE) for the answer"), ("--mlx-path", "")),
    "-o": (("--events", "or a redirect (> FILE) for the answer"), ("--mlx-path", "")),
    "--model": (("--hf-path", "the checkpoint to convert"),),
    "--out": (("--mlx-path", ""), ("--save-path", ""), ("--adapter-path", "")),
}


def printable(text: str) -> str:
    """``text`` safe to write to a UTF-8 terminal (undecodable argv bytes become U+FFFD)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def error_line(message: Any) -> None:
    """Print ``dgemma: error: MESSAGE`` as one line on stderr."""
    text = printable(" ".join(str(message).split()))
    err.print(f"dgemma: error: {text}", style="red", markup=False, highlight=False, soft_wrap=True)


def visible_options(ctx) -> list[str]:
    """The option names a command shows in its help."""
    if ctx is None:
        return []
    return [
        name
        for param in ctx.command.params
        if not getattr(param, "hidden", False)
        for name in (*param.opts, *getattr(param, "secondary_opts", ()))
        if name.startswith("-")
    ]


def suggest(option: str, known: list[str]) -> Optional[str]:
    """The option meant by a mistyped or foreign ``option``, or None."""
    normal = "-" + option.lstrip("-").lower().replace("_", "-")
    normal = ("-" if len(normal) == 2 else "--") + normal.lstrip("-")
    if normal in known and normal != option:
        return normal
    for ours, note in SIMILAR_OPTIONS.get(normal, ()):
        if ours in known:
            return f"{ours} ({note})" if note else ours
    close = difflib.get_close_matches(normal, [k for k in known if k.startswith("--")], n=1, cutoff=0.6)
    return close[0] if close else None


def usage_message(e, argv: Optional[list[str]] = None, commands: Sequence[str] = ()) -> str:
    """One line for a usage error, pointing at the command's help (``argv`` and the app's
    ``commands``: for errors raised without the command's context, such as an option missing its
    value)."""
    ctx = getattr(e, "ctx", None)
    message = e.format_message()
    if isinstance(e, click_exceptions.NoSuchOption):
        message = f"no such option: {e.option_name}"
        hint = suggest(e.option_name, visible_options(ctx))
        if hint:
            message += f" (did you mean {hint}?)"
    path = ctx.command_path if ctx is not None else "dgemma"
    if path == "dgemma":
        words = sys.argv[1:] if argv is None else argv
        name = next((w for w in words if not w.startswith("-")), None)
        if name in commands:
            path = f"dgemma {name}"
    return f"{message.rstrip('.')}; see '{path} --help'"


def quiet_third_party() -> None:
    """No third-party warning or log line reaches the terminal uninvited (``PYTHONWARNINGS`` and
    ``TRANSFORMERS_VERBOSITY`` still work)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.warnoptions:
        warnings.simplefilter("ignore")


def run_app(app, argv: Optional[list[str]] = None) -> int:
    """Run ``app``; return the exit status (0 ok, 1 bad input, 2 usage, 130 Ctrl-C)."""
    try:
        rv = app(args=argv, prog_name="dgemma", standalone_mode=False)
    except click_exceptions.NoArgsIsHelpError as e:
        print(e.ctx.get_help())
        return 0
    except click_exceptions.UsageError as e:
        error_line(usage_message(e, argv, list(typer.main.get_command(app).commands)))
        return e.exit_code
    except click_exceptions.ClickException as e:
        error_line(e.format_message())
        return e.exit_code
    except typer.Abort:
        error_line("aborted")
        return 1
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except KeyboardInterrupt:
        err.print("Interrupted.", style="dim")
        return 130
    except BrokenPipeError:  # the reader went away (| head): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as e:  # a bug: one line, the traceback on request
        if os.environ.get("DGEMMA_DEBUG"):
            raise
        reason = str(e).splitlines()[0] if str(e) else ""
        error_line(f"internal error: {type(e).__name__}: {reason} (DGEMMA_DEBUG=1 shows the traceback; please report it)")
        return 1
    return rv if isinstance(rv, int) else 0
