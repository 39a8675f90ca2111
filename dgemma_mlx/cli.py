"""The ``dgemma`` command line: ``generate``, ``chat``, ``convert``, ``serve`` (and ``infill``/``edit``, in cli_infill).

The CLI parses arguments, calls the library and renders; everything it does is reachable from
Python (:func:`dgemma_mlx.load`, :func:`dgemma_mlx.generate.stream_generate`,
:func:`dgemma_mlx.convert.convert`, :class:`dgemma_mlx.chat.ChatSession`). Model code is imported
only inside the commands, so ``--help`` and argument errors are instant.

The options every sampling command shares (model, seed, steps, entropy bound, temperatures,
max tokens, events, quiet) are added by :func:`sampling_options`, which hands the command one
:class:`SamplingArgs`. Names follow mlx-lm where it has one; older spellings still work, hidden.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

import typer
from rich.console import Console

from .cli_errors import err, error_line
from .errors import DGemmaError
from .settings import DEFAULTS

DEFAULT_MODEL = "mlx-community/diffusiongemma-26B-A4B-it-4bit"

app = typer.Typer(
    name="dgemma",
    help="Run Google's DiffusionGemma locally with MLX and watch every refinement pass.",
    no_args_is_help=True,
    rich_markup_mode=None,  # click-style help: metavars as given (PATH, N), flags without a type
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

def user_errors(command):
    """Report ``DGemmaError`` as one line (exit 1) and Ctrl-C as exit 130, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DGemmaError as e:
            error_line(e)
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

    path = resolve_model_path(model, default=model == DEFAULT_MODEL)
    status = err.status(f"Loading {model} …") if err.is_terminal and not quiet else nullcontext()
    with status:
        return load(path, adapter_path=adapter)


# ------------------------------------------------------------------------------ shared options


def _default(name: str) -> str:
    return f"the checkpoint's, else {getattr(DEFAULTS, name)}"


def _option(default: Any, *names: str, help: Optional[str] = None, metavar: Optional[str] = None, hidden=False):
    return typer.Option(default, *names, help=help, metavar=metavar, hidden=hidden, show_default=False)


# Command-specific options that several commands share.
ModelOpt = _option(
    None, "--model", "-m", metavar="PATH",
    help=f"Local directory or Hugging Face repo id (default: $DGEMMA_MODEL, else {DEFAULT_MODEL}).",
)
SystemPrompt = _option(None, "--system-prompt", metavar="TEXT", help="System prompt.")
SystemAlias = _option(None, "--system", metavar="TEXT", hidden=True)
Think = typer.Option(
    False, "--think/--no-think", metavar="", show_default=False, help="Let the model think before answering (default: no)."
)

Adapter = _option(
    None, "--adapter", metavar="PATH", help="A fine-tuned adapter (dgemma train's output) to load over the model."
)
MaxTokens = _option(
    None, "--max-tokens", metavar="N", help=f"Tokens to generate at most (default: {_default('max_new_tokens')})."
)
Steps = _option(None, "--steps", metavar="N", help=f"Maximum denoising passes per block (default: {_default('steps')}).")
Preset = _option(
    None, "--preset", metavar="NAME",
    help="Sampling preset: reference (default), fast (16 passes at most), faster (8); flags override it.",
)
EntropyBound = _option(
    None, "--entropy-bound", metavar="X",
    help=f"Entropy budget of the positions accepted per pass (default: {_default('entropy_bound')}).",
)
TMin = _option(None, "--t-min", metavar="T", help=f"Temperature the schedule falls towards, from --t-max (default: {_default('t_min')}).")
TMax = _option(None, "--t-max", metavar="T", help=f"Temperature of the first pass (default: {_default('t_max')}).")
Temp = _option(None, "--temp", metavar="T", help="A constant temperature (sets --t-min and --t-max).")
FreezeAccepted = _option(
    None, "--freeze-accepted/--no-freeze-accepted",
    help="Fast sampling (not the reference's): an accepted position keeps its token for the rest of the block, "
    "and later passes compute only the others.",
)
ShortCanvas = _option(
    None, "--short-canvas/--no-short-canvas",
    help="Fast sampling (not the reference's): when fewer tokens than a canvas remain, the last block's canvas "
    "holds only those positions.",
)
TopK = _option(
    None, "--top-k", metavar="K",
    help="Fast sampling (not the reference's): sample and self-condition on each position's K most likely tokens.",
)
Seed = _option(
    None, "--seed", metavar="N", help="Random seed for reproducible runs: 0 <= N < 2**64; -1 (default): random."
)
Events = _option(
    None, "--events", metavar="PATH", help="Write every pass and commit as JSON Lines to PATH ('-': stdout)."
)
Quiet = typer.Option(False, "--quiet", metavar="", help="No live view and no stats: just the result.")
Image = _option(None, "--image", metavar="PATH", help="An image (PNG, JPEG, WebP) placed before the prompt; repeatable.")
ImageTokens = typer.Option(
    280, "--image-tokens", metavar="N", help="Visual tokens per image: 70, 140, 280, 560 or 1120."
)

# (name, annotation, option) of every shared sampling option, in help order.
_SAMPLING: list[tuple[str, Any, Any]] = [
    ("model", Optional[str], ModelOpt),
    ("adapter", Optional[str], Adapter),
    ("max_tokens", Optional[int], MaxTokens),
    ("preset", Optional[str], Preset),
    ("steps", Optional[int], Steps),
    ("entropy_bound", Optional[float], EntropyBound),
    ("t_min", Optional[float], TMin),
    ("t_max", Optional[float], TMax),
    ("temp", Optional[float], Temp),
    ("freeze_accepted", Optional[bool], FreezeAccepted),
    ("top_k", Optional[int], TopK),
    ("short_canvas", Optional[bool], ShortCanvas),
    ("seed", Optional[int], Seed),
    ("events", Optional[str], Events),
    ("quiet", bool, Quiet),
    # Old spellings, hidden.
    ("max_new_tokens", Optional[int], _option(None, "--max-new-tokens", "-n", hidden=True)),
    ("quiet_alias", bool, typer.Option(False, "-q", hidden=True)),
]
_OUTPUT_OPTIONS = ("events", "quiet", "quiet_alias")
_LENGTH_OPTIONS = ("max_tokens", "max_new_tokens")


@dataclass(frozen=True)
class SamplingArgs:
    """The shared options as one command received them (None: not given)."""

    model: Optional[str] = None
    adapter: Optional[str] = None
    max_tokens: Optional[int] = None
    preset: Optional[str] = None
    steps: Optional[int] = None
    entropy_bound: Optional[float] = None
    t_min: Optional[float] = None
    t_max: Optional[float] = None
    temp: Optional[float] = None
    freeze_accepted: Optional[bool] = None
    top_k: Optional[int] = None
    short_canvas: Optional[bool] = None
    seed: Optional[int] = None
    events: Optional[str] = None
    quiet: bool = False

    @property
    def model_name(self) -> str:
        """``--model``, else ``$DGEMMA_MODEL``, else the default model."""
        return self.model or default_model()

    def load(self, quiet: bool = False):
        """``(model, tokenizer)`` for these options (``--model`` with ``--adapter``), loaded with
        :func:`load_with_status`."""
        return load_with_status(self.model_name, quiet, adapter=self.adapter)

    def overrides(self) -> dict[str, Any]:
        """The :class:`~dgemma_mlx.settings.GenerationSettings` overrides, checked (raises
        :class:`DGemmaError` before any model is loaded)."""
        if self.temp is not None and (self.t_min is not None or self.t_max is not None):
            raise DGemmaError("--temp sets a constant temperature: give either --temp or --t-min/--t-max")
        values = dict(
            max_new_tokens=self.max_tokens, steps=self.steps, entropy_bound=self.entropy_bound,
            t_min=self.t_min, t_max=self.t_max, temp=self.temp, seed=self.seed, freeze_accepted=self.freeze_accepted,
            top_k=self.top_k, short_canvas=self.short_canvas,
        )
        values = {k: v for k, v in values.items() if v is not None}
        if self.preset is not None:
            from .settings import PRESETS

            if self.preset not in PRESETS:
                raise DGemmaError(f"unknown --preset '{self.preset}' (choose {', '.join(PRESETS)})")
            values = {**PRESETS[self.preset], **values}
        DEFAULTS.update(**values)
        return values


def sampling_options(command: Optional[Callable] = None, *, output: bool = True, length: bool = True):
    """Add the shared sampling options to a command, which receives them as ``sampling:
    SamplingArgs``. ``output=False`` leaves out ``--events`` and ``--quiet``; ``length=False``
    leaves out ``--max-tokens`` (commands whose output length is set otherwise)."""
    if command is None:
        return functools.partial(sampling_options, output=output, length=length)
    skip = (() if output else _OUTPUT_OPTIONS) + (() if length else _LENGTH_OPTIONS)
    shared = [(n, a, o) for n, a, o in _SAMPLING if n not in skip]
    names = [n for n, _, _ in shared]

    @functools.wraps(command)
    def wrapper(**kwargs):
        given = {n: kwargs.pop(n) for n in names}
        if given.get("max_tokens") is None:
            given["max_tokens"] = given.get("max_new_tokens")
        given["quiet"] = bool(given.get("quiet") or given.get("quiet_alias"))
        fields = {k: v for k, v in given.items() if k in SamplingArgs.__dataclass_fields__}
        return command(sampling=SamplingArgs(**fields), **kwargs)

    own = [p for p in inspect.signature(command).parameters.values() if p.name != "sampling"]
    arguments = [p for p in own if isinstance(p.default, typer.models.ArgumentInfo)]
    options = [p for p in own if p not in arguments]
    kw = inspect.Parameter.KEYWORD_ONLY
    added = [inspect.Parameter(n, kw, default=o, annotation=a) for n, a, o in shared]
    params = [p.replace(kind=kw) for p in arguments] + added + [p.replace(kind=kw) for p in options]
    wrapper.__signature__ = inspect.Signature(params)
    wrapper.__annotations__ = {p.name: p.annotation for p in params}
    del wrapper.__wrapped__  # Typer must see the combined signature
    return wrapper


# ------------------------------------------------------------------------------------- inputs


def read_prompt(prompt: Optional[str]) -> str:
    """The prompt: the argument, or stdin for ``-`` or a pipe (one trailing newline dropped, so a
    piped prompt equals the same text given as an argument)."""
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise DGemmaError("no prompt given: pass PROMPT, or pipe it on stdin")
        stream = getattr(sys.stdin, "buffer", None)
        if stream is not None:
            try:
                prompt = stream.read().decode("utf-8")
            except UnicodeDecodeError as e:
                raise DGemmaError(f"the prompt on stdin is not valid UTF-8 (byte {e.start})")
        else:
            prompt = sys.stdin.read()
        prompt = prompt[:-2] if prompt.endswith("\r\n") else prompt[:-1] if prompt.endswith("\n") else prompt
    else:
        check_utf8(prompt, "the prompt")
    if not prompt.strip():
        raise DGemmaError("the prompt is empty")
    return prompt


def check_utf8(text: Optional[str], what: str) -> None:
    """Reject a command-line argument that was not valid UTF-8 (Python keeps its bytes as lone
    surrogates)."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DGemmaError(f"{what} is not valid UTF-8")


def checked_system_prompt(system_prompt: Optional[str], alias: Optional[str], sampling: SamplingArgs) -> Optional[str]:
    """``--system-prompt``, else its hidden old spelling ``--system``; it and ``--model`` checked
    to be valid UTF-8."""
    system_prompt = system_prompt if system_prompt is not None else alias
    check_utf8(system_prompt, "the system prompt")
    check_utf8(sampling.model, "the model path")
    return system_prompt


def read_image_files(paths: list[str], image_tokens: int) -> list:
    """Check the budget and read every image before the (slow) model load."""
    from .image_processing import check_budget, load_image

    check_budget(image_tokens)
    return [(p, load_image(p)) for p in paths]


def encode_images(model, pictures: list, image_tokens: int, quiet: bool = False) -> list:
    """Run the vision tower once per image (with a spinner on a terminal)."""
    from .multimodal import read_images, require_vision

    if not pictures:
        return []
    require_vision(model)
    status = err.status(f"Encoding {len(pictures)} image(s) …") if err.is_terminal and not quiet else nullcontext()
    with status:
        images = read_images(model, [im for _, im in pictures], image_tokens)
    return [replace(im, source=p) for im, (p, _) in zip(images, pictures)]


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
        except (OSError, ValueError) as e:
            raise DGemmaError(f"cannot write events to '{target}': {getattr(e, 'strerror', None) or e}")
        with f:
            yield f


# ----------------------------------------------------------------------------------- commands


@app.command()
@sampling_options
@user_errors
def generate(
    prompt: Optional[str] = typer.Argument(None, metavar="PROMPT", show_default=False, hidden=True),
    system_prompt: Optional[str] = SystemPrompt,
    think: bool = Think,
    ignore_chat_template: bool = typer.Option(
        False, "--ignore-chat-template", metavar="", help="Send the prompt as raw text."
    ),
    system: Optional[str] = SystemAlias,
    no_chat_template: bool = typer.Option(False, "--no-chat-template", hidden=True),
    prompt_option: Optional[str] = _option(None, "--prompt", "-p", hidden=True),
    image: Optional[list[str]] = Image,
    image_tokens: int = ImageTokens,
    *,
    sampling: SamplingArgs,
):
    """Generate an answer to PROMPT ('-' or a pipe: read from stdin), showing every refinement
    pass live."""
    overrides = sampling.overrides()
    if prompt is not None and prompt_option is not None:
        raise DGemmaError("give the prompt once: as PROMPT or with --prompt")
    text = read_prompt(prompt if prompt is not None else prompt_option)
    system_prompt = checked_system_prompt(system_prompt, system, sampling)

    from .events import EndEvent, event_to_json
    from .generate import stream_generate
    from .multimodal import build_image_prompt
    from .render import format_stats, make_view

    pictures = read_image_files(image or [], image_tokens)
    mdl, tok = sampling.load(sampling.quiet)
    images = encode_images(mdl, pictures, image_tokens, sampling.quiet)
    ids = build_image_prompt(
        mdl, tok, text, images, system=system_prompt, think=think,
        chat_template=not (ignore_chat_template or no_chat_template),
    )
    out = Console(highlight=False)
    view = None if sampling.events == "-" else make_view(tok, out, plain=sampling.quiet or not out.is_terminal)
    end = None
    with open_events(sampling.events) as sink, (view or nullcontext()):
        for event in stream_generate(mdl, tok, ids, images=images, **overrides):
            if sink is not None:
                sink.write(json.dumps(event_to_json(event)) + "\n")
                sink.flush()
            if view is not None:
                view.update(event)
            if isinstance(event, EndEvent):
                end = event
    if end is not None and not sampling.quiet:
        err.print(format_stats(end.stats), style="dim", soft_wrap=True)


@app.command()
@sampling_options(output=False)
@user_errors
def chat(
    system_prompt: Optional[str] = SystemPrompt,
    think: bool = Think,
    verbose: bool = typer.Option(False, "--verbose", "-v", metavar="", help="Report cache reuse and rewinds every turn."),
    no_history: bool = typer.Option(
        False, "--no-history", metavar="", help="Keep no input history on disk (also: DGEMMA_HISTORY='')."
    ),
    system: Optional[str] = SystemAlias,
    image: Optional[list[str]] = _option(
        None, "--image", metavar="PATH",
        help="An image attached to the first message; repeatable (/image PATH in the chat).",
    ),
    image_tokens: int = ImageTokens,
    *,
    sampling: SamplingArgs,
):
    """Chat in a multi-turn REPL that keeps the prefix cache across turns (/help lists commands)."""
    overrides = sampling.overrides()
    system_prompt = checked_system_prompt(system_prompt, system, sampling)

    from .chat import ChatSession, run_repl
    from .generate import default_settings

    pictures = read_image_files(image or [], image_tokens)
    mdl, tok = sampling.load()
    session = ChatSession(
        mdl, tok, system=system_prompt, think=think, settings=default_settings(mdl).update(**overrides), verbose=verbose
    )
    run_repl(
        session, Console(highlight=False), images=[p for p, _ in pictures], image_tokens=image_tokens,
        **({"history_file": None} if no_history else {}),
    )


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            v = version("dgemma-mlx")
        except PackageNotFoundError:
            v = "unknown"
        typer.echo(f"dgemma {v}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", "-V", metavar="", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Run Google's DiffusionGemma locally with MLX and watch every refinement pass."""


from . import cli_infill, cli_serve, cli_sudoku, train_cli  # noqa: E402,F401  (register the other commands)


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 bad input, 2 usage, 130 Ctrl-C)."""
    from .cli_errors import quiet_third_party, run_app

    quiet_third_party()
    return run_app(app, argv)
