"""The ``dgemma`` command line: ``generate``, ``chat`` and ``convert``.

The CLI parses arguments, calls the library and renders; everything it does is reachable from
Python (:func:`dgemma_mlx.load`, :func:`dgemma_mlx.generate.stream_generate`,
:func:`dgemma_mlx.convert.convert`, :class:`dgemma_mlx.chat.ChatSession`).
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Optional

import functools

import typer
from rich.console import Console

from .errors import DGemmaError

DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"

app = typer.Typer(
    name="dgemma",
    help="Run Google's DiffusionGemma locally with MLX and watch every refinement pass.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

err = Console(stderr=True, highlight=False)


def user_errors(command):
    """Report ``DGemmaError`` as one line (exit 1) and Ctrl-C as exit 130, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DGemmaError as e:
            err.print(f"dgemma: error: {e}", style="red", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1)
        except KeyboardInterrupt:
            err.print("Interrupted.", style="dim")
            raise typer.Exit(130)

    return wrapper


def default_model() -> str:
    return os.environ.get("DGEMMA_MODEL") or DEFAULT_MODEL


def load_with_status(model: str, quiet: bool = False, adapter: Optional[str] = None):
    """Load ``(model, tokenizer)``: a repo id is first fetched into the Hugging Face cache (with
    huggingface_hub's download progress), then a spinner shows while the weights load.
    ``adapter``: LoRA adapters (``dgemma train``) to apply."""
    from .loading import load, resolve_model_path

    path = resolve_model_path(model)
    status = err.status(f"Loading {model} …") if err.is_terminal and not quiet else nullcontext()
    with status:
        return load(path, adapter_path=adapter)


# Shared sampling options (generate and chat).
MaxNewTokens = typer.Option(None, "--max-new-tokens", "-n", help="Tokens to generate at most (default: the checkpoint's, 256).")
Steps = typer.Option(None, "--steps", help="Maximum denoising passes per block (default: the checkpoint's, 48).")
EntropyBound = typer.Option(None, "--entropy-bound", help="Entropy budget of the positions accepted per pass (default 0.1).")
TMin = typer.Option(None, "--t-min", help="Temperature of the last pass (default 0.4).")
TMax = typer.Option(None, "--t-max", help="Temperature of the first pass (default 0.8).")
Seed = typer.Option(None, "--seed", help="Random seed, for reproducible runs.")
System = typer.Option(None, "--system", help="System prompt.")
Think = typer.Option(False, "--think/--no-think", help="Let the model think before answering.")
ModelOpt = typer.Option(
    None, "--model", "-m", help=f"Local directory or Hugging Face repo id (default: $DGEMMA_MODEL, else {DEFAULT_MODEL})."
)
AdapterOpt = typer.Option(None, "--adapter", help="LoRA adapters trained with `dgemma train` (their directory).")


def sampling_overrides(**values) -> dict:
    return {k: v for k, v in values.items() if v is not None}


def check_overrides(overrides: dict) -> None:
    """Validate user settings before the (slow) model load."""
    from .generate import GenerationSettings

    GenerationSettings().update(**overrides)


def read_prompt(prompt: Optional[str]) -> str:
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise DGemmaError("no prompt given: pass PROMPT, or pipe it on stdin")
        prompt = sys.stdin.read()
    if not prompt.strip():
        raise DGemmaError("the prompt is empty")
    return prompt


@contextmanager
def open_events(target: Optional[str]):
    """A JSON Lines sink for events: a file, stdout for ``-``, or None."""
    if target is None:
        yield None
    elif target == "-":
        yield sys.stdout
    else:
        try:
            f = open(target, "w", encoding="utf-8")
        except OSError as e:
            raise DGemmaError(f"cannot write events to '{target}': {e.strerror}")
        with f:
            yield f


@app.command()
@user_errors
def generate(
    prompt: Optional[str] = typer.Argument(None, help="The prompt; '-' or a pipe reads it from stdin."),
    model: Optional[str] = ModelOpt,
    adapter: Optional[str] = AdapterOpt,
    max_new_tokens: Optional[int] = MaxNewTokens,
    steps: Optional[int] = Steps,
    entropy_bound: Optional[float] = EntropyBound,
    t_min: Optional[float] = TMin,
    t_max: Optional[float] = TMax,
    seed: Optional[int] = Seed,
    system: Optional[str] = System,
    think: bool = Think,
    no_chat_template: bool = typer.Option(False, "--no-chat-template", help="Send the prompt as raw text."),
    events: Optional[str] = typer.Option(
        None, "--events", help="Write every pass and commit as JSON Lines to FILE ('-': stdout)."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No live view and no stats: just the answer."),
):
    """Generate an answer, showing every refinement pass live."""
    from .channels import channel_ids
    from .events import EndEvent, event_to_json
    from .generate import build_prompt, stream_generate
    from .render import LiveView, PlainView, format_stats

    overrides = sampling_overrides(
        max_new_tokens=max_new_tokens, steps=steps, entropy_bound=entropy_bound, t_min=t_min, t_max=t_max, seed=seed
    )
    check_overrides(overrides)
    text = read_prompt(prompt)
    name = model or default_model()
    mdl, tok = load_with_status(name, quiet, adapter)
    ids = build_prompt(tok, text, system=system, think=think, chat_template=not no_chat_template)

    out = Console(highlight=False)
    start, end_id = channel_ids(tok)
    if events == "-":
        view = None
    elif out.is_terminal and not quiet:
        view = LiveView(tok, out, channel_start_id=start, channel_end_id=end_id)
    else:
        view = PlainView(tok, sys.stdout, channel_start_id=start, channel_end_id=end_id)
    end = None
    with open_events(events) as sink, (view or nullcontext()):
        for event in stream_generate(mdl, tok, ids, **overrides):
            if sink is not None:
                sink.write(json.dumps(event_to_json(event)) + "\n")
                sink.flush()
            if view is not None:
                view.update(event)
            if isinstance(event, EndEvent):
                end = event
    if end is not None and not quiet:
        err.print(format_stats(end.stats), style="dim", soft_wrap=True)


@app.command()
@user_errors
def chat(
    model: Optional[str] = ModelOpt,
    adapter: Optional[str] = AdapterOpt,
    max_new_tokens: Optional[int] = MaxNewTokens,
    steps: Optional[int] = Steps,
    entropy_bound: Optional[float] = EntropyBound,
    t_min: Optional[float] = TMin,
    t_max: Optional[float] = TMax,
    seed: Optional[int] = Seed,
    system: Optional[str] = System,
    think: bool = Think,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Report cache reuse and rewinds every turn."),
):
    """Chat in a multi-turn REPL that keeps the prefix cache across turns (/help lists commands)."""
    from .chat import ChatSession, run_repl
    from .generate import default_settings

    overrides = sampling_overrides(
        max_new_tokens=max_new_tokens, steps=steps, entropy_bound=entropy_bound, t_min=t_min, t_max=t_max, seed=seed
    )
    check_overrides(overrides)
    name = model or default_model()
    mdl, tok = load_with_status(name, adapter=adapter)
    session = ChatSession(
        mdl, tok, system=system, think=think, settings=default_settings(mdl).update(**overrides), verbose=verbose
    )
    run_repl(session, Console(highlight=False))


@app.command()
@user_errors
def convert(
    hf_path: str = typer.Option(..., "--hf-path", help="Original checkpoint: local directory or repo id."),
    mlx_path: str = typer.Option(..., "--mlx-path", help="Output directory."),
    quantize: bool = typer.Option(False, "--quantize", "-q", help="Quantize (experts at --q-bits, the rest at 8)."),
    q_bits: int = typer.Option(4, "--q-bits", help="Bits of the expert weights: 4 or 8."),
    q_group_size: int = typer.Option(64, "--q-group-size", help="Quantization group size: 32, 64 or 128."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float16, bfloat16 or float32 (default: the source dtype)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --mlx-path."),
):
    """Convert a Hugging Face DiffusionGemma checkpoint to MLX (optionally quantized)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from .convert import convert as run_convert

    progress = Progress(
        TextColumn("[bold]Converting"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,
    )
    task = None

    def report(stage: str, done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task(stage, total=total)
        progress.update(task, completed=done)

    with progress:
        out = run_convert(
            hf_path, mlx_path, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
            dtype=dtype, force=force, progress=report,
        )
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    err.print(f"Wrote {out} ({size / 2**30:.2f} GiB)")


from . import train_cli  # noqa: E402,F401  (registers `train` and `fuse`)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 bad input, 2 usage, 130 Ctrl-C)."""
    try:
        app(args=argv, prog_name="dgemma")
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return 0
