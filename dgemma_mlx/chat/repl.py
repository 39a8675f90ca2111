"""The interactive loop behind ``dgemma chat``.

:class:`ChatRepl` reads lines and handles commands (``/help``, ``/reset``, ``/system``, ``/think``,
``/params``, ``/save``, ``/load``, ``/stats``, ``/image``, ``/exit``) and messages over a
:class:`~dgemma_mlx.chat.session.ChatSession`; its input is injectable so scripts and tests can
drive it. :func:`run_repl` runs it.
"""

from __future__ import annotations

import os
import shlex
import sys
from contextlib import closing
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from ..errors import DGemmaError
from ..events import CommitEvent, EndEvent, Event
from ..files import PathLike
from ..image_processing import DEFAULT_IMAGE_TOKENS, check_budget
from ..multimodal import PromptImage, read_images
from ..canvas import terminal_safe
from ..render import make_view, plural
from ..settings import GenerationSettings
from .session import ChatSession
from .stats import format_chat_stats

__all__ = ["ChatRepl", "run_repl", "parse_params", "default_history_file", "hide_thoughts", "HELP"]

_PARAM_ALIASES = {"max_tokens": "max_new_tokens", "n": "max_new_tokens", "max_denoising_steps": "steps"}
_SETTING_NAMES = tuple(f.name for f in fields(GenerationSettings))


def parse_params(text: str) -> dict[str, Any]:
    """``"steps=16 t_max=0.9"`` -> ``{"steps": "16", "t_max": "0.9"}`` (dashes allowed in names,
    ``seed=none`` or ``seed=-1`` asks for a random seed, ``temp=T`` sets a constant temperature).
    Raises :class:`DGemmaError` on a malformed item; values are checked when they are applied."""
    try:
        items = shlex.split(text)
    except ValueError as e:
        raise DGemmaError(f"cannot parse parameters: {e}")
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().lstrip("-").replace("-", "_").lower()
        key = _PARAM_ALIASES.get(key, key)
        if not sep or not key or not value.strip():
            raise DGemmaError(f"expected NAME=VALUE, got '{item}'")
        if key not in _SETTING_NAMES:
            raise DGemmaError(f"unknown setting '{key}' (settings: {', '.join(_SETTING_NAMES)})")
        out[key] = value.strip()
    return out


def default_history_file() -> Optional[Path]:
    """Where the REPL keeps its input history: ``$DGEMMA_HISTORY`` (empty: none), else the user's
    data directory (``$XDG_DATA_HOME`` or ``~/.local/share``; ``~/Library/Application Support`` on
    macOS) ``/dgemma/chat_history``."""
    env = os.environ.get("DGEMMA_HISTORY")
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Application Support"
    elif os.name == "nt":
        base = Path(os.environ.get("APPDATA") or Path.home())
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return base / "dgemma" / "chat_history"


HELP = """\
Type a message and press Enter. Commands:
  /help                  this help
  /reset                 start a new conversation (system prompt, thinking and settings stay)
  /system [TEXT | -]     show, set or clear ('-') the system prompt
  /think on|off          let the model think before answering, or not
  /think show|hide       show the thoughts (dim) or collapse them to one line
  /params [NAME=VALUE …] show or set sampling settings, e.g. /params steps=16 t_max=0.9 seed=-1
                         (temp=T: a constant temperature; seed=-1 or none: random)
  /save FILE             save the transcript as JSON
  /load FILE             load a transcript (replaces the conversation)
  /stats                 cache and speed statistics
  /image PATH            attach an image to your next message (repeatable)
  /exit                  leave (Ctrl-D also leaves)
Ctrl-C stops a reply and keeps the conversation. Start a message with // to send a literal '/'."""

_EXIT = object()


def hide_thoughts(event: Event, on_thought: Optional[Callable[[], None]] = None) -> Event:
    """``event`` without its thought text (``/think hide``); ``on_thought()`` is called when a
    commit carried some."""
    if isinstance(event, CommitEvent):
        if event.thought and on_thought is not None:
            on_thought()
        return replace(event, thought="", segments=tuple(s for s in event.segments if s.kind != "thought"))
    if isinstance(event, EndEvent):
        return replace(event, thought="")
    return event


class ChatRepl:
    """The interactive loop of ``dgemma chat`` over a :class:`ChatSession`.

    Args:
        session: the conversation.
        console: a Rich console for all output (replies use :class:`~dgemma_mlx.render.LiveView`
            when it is a terminal, else :class:`~dgemma_mlx.render.PlainView` on its file).
        input_fn: ``input_fn(prompt) -> line``; raises ``EOFError`` to leave (Ctrl-D) and
            ``KeyboardInterrupt`` to drop the line. Default: prompt_toolkit with history on a
            terminal, else lines of stdin.
        history_file: input history of the prompt_toolkit prompt (default
            :func:`default_history_file`; None keeps it in memory only).
        show_thoughts: show thoughts (dim) or collapse them to one line (``/think show|hide``).
        view_factory: ``view_factory(tokenizer, console)`` -> a view (default
            :func:`~dgemma_mlx.render.make_view`).
        images: image files attached to the first message; ``image_tokens``: their token budget
            (and that of ``/image``).
    """

    prompt = "> "

    def __init__(
        self,
        session: ChatSession,
        console=None,
        *,
        input_fn: Optional[Callable[[str], str]] = None,
        history_file: Union[PathLike, None, bool] = True,
        show_thoughts: bool = True,
        view_factory: Optional[Callable] = None,
        images: Sequence[PathLike] = (),
        image_tokens: int = DEFAULT_IMAGE_TOKENS,
    ):
        from rich.console import Console

        self.session = session
        self.console = console if console is not None else Console(highlight=False)
        self.show_thoughts = show_thoughts
        self.view_factory = view_factory or make_view
        self._input_fn = input_fn
        self._history_file = default_history_file() if history_file is True else history_file
        self.image_tokens = check_budget(image_tokens)
        self.pending: list[PromptImage] = read_images(session.model, list(images), image_tokens) if images else []
        if session.log is None:
            session.log = lambda text: self.console.print(text, style="dim", markup=False, highlight=False)

    # -- output ----------------------------------------------------------------------------------

    def say(self, text: str, style: Optional[str] = None) -> None:
        if self.console.is_terminal:
            text = terminal_safe(text)
        self.console.print(text, style=style, markup=False, highlight=False, soft_wrap=True)

    def error(self, message: Any) -> None:
        self.say(f"error: {' '.join(str(message).split())}", style="red")

    def note(self, text: str) -> None:
        """Measurements: dim on a terminal; on stderr when the output is piped (stdout keeps
        only the conversation)."""
        if self.console.is_terminal:
            self.say(text, style="dim")
        else:
            print(text, file=sys.stderr)

    # -- input -----------------------------------------------------------------------------------

    def _reader(self) -> Callable[[str], str]:
        if self._input_fn is not None:
            return self._input_fn
        if sys.stdin.isatty() and sys.stdout.isatty():
            from prompt_toolkit import PromptSession
            from prompt_toolkit.history import FileHistory, InMemoryHistory

            history = InMemoryHistory()
            if self._history_file:
                path = Path(self._history_file)
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.touch(exist_ok=True)
                    history = FileHistory(str(path))
                except OSError:
                    pass
            prompt_session = PromptSession(history=history)
            return lambda p: prompt_session.prompt([("bold", p)])

        def read_line(_prompt: str) -> str:
            stream = getattr(sys.stdin, "buffer", None)
            line = stream.readline() if stream is not None else sys.stdin.readline()
            if not line:
                raise EOFError
            if isinstance(line, bytes):
                try:
                    line = line.decode("utf-8")
                except UnicodeDecodeError:
                    self.error("the line is not valid UTF-8; it was skipped")
                    return ""
            return line.rstrip("\r\n")

        return read_line

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> int:
        """Read and handle lines until ``/exit`` or end of input; returns 0."""
        s = self.session
        path = getattr(s.model, "path", None)
        self.say(
            f"dgemma chat · {Path(path).name if path else 'model'} · thinking {'on' if s.think else 'off'}"
            " · /help for commands, Ctrl-D to leave",
            style="dim",
        )
        read = self._reader()
        while True:
            try:
                line = read(self.prompt)
            except KeyboardInterrupt:
                continue
            except EOFError:
                break
            if self.handle(line) is _EXIT:
                break
        return 0

    def handle(self, line: str):
        """Handle one input line: a command or a message. Returns a sentinel on ``/exit``."""
        text = line.strip()
        if not text:
            return None
        if text.startswith("//"):
            return self.send(text[1:])
        if text.startswith("/"):
            try:
                return self.command(text)
            except DGemmaError as e:
                self.error(e)
                return None
        return self.send(text)

    def command(self, text: str):
        name, _, arg = text.partition(" ")
        name, arg = name.lower(), arg.strip()
        s = self.session
        if name in ("/exit", "/quit", "/q"):
            return _EXIT
        if name in ("/help", "/?"):
            self.say(HELP)
        elif name == "/reset":
            s.reset()
            self.say("new conversation (cache cleared)", style="dim")
        elif name == "/system":
            if not arg:
                self.say(f"system prompt: {s.system}" if s.system else "no system prompt (/system TEXT sets one)")
            elif arg == "-":
                s.set_system(None)
                self.say("system prompt cleared", style="dim")
            else:
                s.set_system(arg)
                self.say("system prompt set", style="dim")
        elif name == "/think":
            self._think(arg.lower())
        elif name == "/params":
            if arg:
                s.set_params(**parse_params(arg))
            shown = {**s.settings.to_dict(), "seed": s.settings.seed if s.settings.seed is not None else "random"}
            self.say(" ".join(f"{k}={v}" for k, v in shown.items()))
        elif name == "/save":
            if not arg:
                raise DGemmaError("usage: /save FILE")
            path = s.save(_unquote(arg))
            self.say(f"saved {len(s.messages)} messages to {path}", style="dim")
        elif name == "/load":
            if not arg:
                raise DGemmaError("usage: /load FILE")
            s.load(_unquote(arg))
            self.say(f"loaded {len(s.messages)} messages from {_unquote(arg)}", style="dim")
        elif name == "/stats":
            self.say(format_chat_stats(s.stats))
        elif name == "/image":
            if not arg:
                raise DGemmaError("usage: /image PATH")
            image = read_images(s.model, [_unquote(arg)], self.image_tokens)[0]
            self.pending.append(image)
            self.say(f"attached {image.source} ({image.num_tokens} image tokens) to your next message", style="dim")
        else:
            raise DGemmaError(f"unknown command '{name}' (/help lists the commands)")
        return None

    def _think(self, arg: str) -> None:
        s = self.session
        if arg == "on":
            s.set_think(True)
        elif arg == "off":
            s.set_think(False)
        elif arg == "show":
            self.show_thoughts = True
        elif arg == "hide":
            self.show_thoughts = False
        elif arg:
            raise DGemmaError(f"usage: /think on|off|show|hide (got '{arg}')")
        self.say(
            f"thinking {'on' if s.think else 'off'}, thoughts {'shown' if self.show_thoughts else 'hidden'}",
            style="dim",
        )

    def send(self, text: str):
        """Generate and show the reply to ``text``."""
        s = self.session
        try:
            events = s.send(text, self.pending)
        except DGemmaError as e:
            self.error(e)
            return None
        self.pending = []
        before = len(s.messages)
        view = self.view_factory(s.tokenizer, self.console)
        marked = []

        def marker() -> None:
            if self.console.is_terminal and not marked:
                marked.append(True)
                self.say("(thinking… hidden: /think show)", style="dim")
        end = None
        interrupted = False
        try:
            with closing(events), view:
                for event in events:
                    if not self.show_thoughts:
                        event = hide_thoughts(event, marker)
                    view.update(event)
                    if isinstance(event, EndEvent):
                        end = event
        except KeyboardInterrupt:
            interrupted = True
        except DGemmaError as e:
            self.error(e)
            return None
        if interrupted or end is None or end.finish_reason == "cancelled":
            kept = len(s.messages) > before
            self.say(
                "reply stopped; " + ("the partial answer was kept" if kept else "the message was not added"),
                style="yellow",
            )
            return None
        turn = s.stats.per_turn[-1]
        g = end.stats
        self.note(
            f"{plural(g.generated_tokens, 'token')} · {plural(g.blocks, 'block')} · {plural(g.steps, 'pass', 'passes')}"
            f" · {g.generation_tps:.1f} tok/s"
            f" · encoded {turn.encoded} new of {turn.prompt_tokens} conversation tokens"
            f" · cache {s.cache.offset}/{s.context}"
        )
        return None


def _unquote(arg: str) -> str:
    try:
        parts = shlex.split(arg)
    except ValueError:
        return arg
    return parts[0] if len(parts) == 1 else arg


def run_repl(
    session: ChatSession,
    console=None,
    input_fn: Optional[Callable[[str], str]] = None,
    **kwargs: Any,
) -> int:
    """Run the chat loop (see :class:`ChatRepl`); returns the exit status (0)."""
    return ChatRepl(session, console, input_fn=input_fn, **kwargs).run()
