"""Multi-turn chat that never re-reads the conversation.

:class:`ChatSession` keeps the conversation (user and assistant turns; thoughts are not fed back,
as the model card asks) together with a :class:`~dgemma_mlx.cache.PrefixCache` and the token ids
that cache holds. Each turn renders the whole conversation with the tokenizer's chat template,
compares it with the cached ids and encodes only what is new::

    cached: <bos> <|turn>user\n Q1 <turn|>\n | <|turn>model\n <|channel>thought\n<channel|> A1…
    next:   <bos> <|turn>user\n Q1 <turn|>\n | <|turn>model\n A1 <turn|>\n <|turn>user\n Q2 <turn|>\n <gen>
                                           ^ checkpoint: rewound to here, the rest is encoded

The template re-renders an earlier reply differently from what was generated (the empty thought
channel of the generation prompt is gone, the reply is re-tokenized from its text), so the cache
falls back to the longest common token prefix, rewound to the latest checkpoint at or before it.
A checkpoint is taken every turn right after the conversation rendered *without* the generation
prompt, the point the next turn shares, so a turn encodes the previous reply as the template
renders it, the new user turn and the generation prompt: work proportional to the new tokens, not
to the length of the conversation.

:func:`run_repl` is the interactive loop behind ``dgemma chat`` (commands ``/help``, ``/reset``,
``/system``, ``/think``, ``/params``, ``/save``, ``/load``, ``/stats``, ``/exit``); its input is
injectable so scripts and tests can drive it.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
from contextlib import closing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .channels import ChannelSplitter, channel_ids
from .errors import DGemmaError
from .events import CommitEvent, EndEvent, Event, GenerationStats
from .files import atomic_write_text
from .generate import GenerationSettings, default_settings, render_chat, stream_generate
from .image_processing import DEFAULT_IMAGE_TOKENS, check_budget
from .multimodal import (
    PromptImage,
    check_image_context,
    expand_image_tokens,
    features_of,
    image_runs,
    images_from_json,
    images_to_json,
    message_images,
    read_images,
    resume_point,
    template_messages,
)

__all__ = [
    "ChatSession",
    "ChatStats",
    "TurnStats",
    "TRANSCRIPT_FORMAT",
    "ChatRepl",
    "run_repl",
    "parse_params",
    "format_chat_stats",
    "default_history_file",
]

TRANSCRIPT_FORMAT = "dgemma-chat"
TRANSCRIPT_VERSION = 1
ROLES = ("user", "assistant")

PathLike = Union[str, "os.PathLike[str]"]


# ----------------------------------------------------------------------------------------- stats


@dataclass(frozen=True)
class TurnStats:
    """What one turn cost.

    Attributes:
        prompt_tokens: length of the whole conversation as rendered for this turn (generation
            prompt included): what a tool without a cache would encode.
        reused: tokens of it that were already in the cache.
        encoded: tokens of it encoded this turn (``prompt_tokens - reused``).
        reply_encoded: tokens of committed reply blocks encoded during generation (every block but
            the last).
        rewound_from: the cache length before a rewind, or None when the cache was only extended.
        generated: tokens generated (before EOS).
        finish_reason: ``"eos"``, ``"length"`` or ``"cancelled"``.
        generation: the generation's measurements.
    """

    prompt_tokens: int
    reused: int
    encoded: int
    reply_encoded: int = 0
    rewound_from: Optional[int] = None
    generated: int = 0
    finish_reason: str = "cancelled"
    generation: GenerationStats = field(default_factory=GenerationStats)

    @property
    def total_encoded(self) -> int:
        """Every token passed to ``model.encode`` this turn."""
        return self.encoded + self.reply_encoded


@dataclass(frozen=True)
class ChatStats:
    """A snapshot of a session (see :attr:`ChatSession.stats`).

    ``turns`` counts the replies generated since the last reset or load (one :class:`TurnStats`
    each, cancelled replies included); ``messages`` is the length of the conversation.
    """

    turns: int
    messages: int
    cache_tokens: int
    cache_bytes: int
    context: int
    per_turn: tuple[TurnStats, ...]
    last_generation: Optional[GenerationStats]

    @property
    def encoded_per_turn(self) -> list[int]:
        return [t.total_encoded for t in self.per_turn]


def format_chat_stats(stats: ChatStats) -> str:
    """A few lines for ``/stats``."""
    from .render import format_stats

    lines = [
        f"turns: {stats.turns} · messages: {stats.messages} · cache: {stats.cache_tokens} tokens "
        f"({stats.cache_bytes / 2**20:.1f} MiB) of a {stats.context}-token context"
    ]
    if stats.per_turn:
        lines.append("encoded per turn: " + ", ".join(str(n) for n in stats.encoded_per_turn) + " tokens")
        lines.append(
            "conversation per turn: " + ", ".join(str(t.prompt_tokens) for t in stats.per_turn) + " tokens"
        )
    if stats.last_generation is not None:
        lines.append(format_stats(stats.last_generation))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------- helpers


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


_PARAM_ALIASES = {"max_tokens": "max_new_tokens", "n": "max_new_tokens", "max_denoising_steps": "steps"}
_SETTING_NAMES = tuple(f.name for f in fields(GenerationSettings))


def parse_params(text: str) -> dict[str, Any]:
    """``"steps=16 t_max=0.9"`` -> ``{"steps": "16", "t_max": "0.9"}`` (dashes allowed in names,
    ``seed=none`` unsets the seed). Raises :class:`DGemmaError` on a malformed item."""
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


def _apply_settings(settings: GenerationSettings, values: dict[str, Any]) -> GenerationSettings:
    """``settings`` with ``values`` applied one by one (so an error names its setting)."""
    for key, value in values.items():
        if key not in _SETTING_NAMES:
            raise DGemmaError(f"unknown setting '{key}'")
        if key == "seed" and (value is None or str(value).strip().lower() in ("none", "null", "random", "")):
            settings = replace(settings, seed=None)
            continue
        if isinstance(value, str):
            value = value.strip()
        try:
            settings = settings.update(**{key: value})
        except DGemmaError as e:
            if "wrong type" in str(e):
                raise DGemmaError(f"bad value for {key}: {value!r}")
            raise
    return settings


# ------------------------------------------------------------------------------------- session


class ChatSession:
    """A conversation with a persistent prefix cache.

    Args:
        model, tokenizer: from :func:`dgemma_mlx.load`; the tokenizer needs a chat template.
        system: system prompt (None: none).
        think: let the model think before answering (the template's ``enable_thinking``).
        settings: sampling settings (default: the checkpoint's, :func:`default_settings`).
        verbose: record (and pass to ``log``) notices about cache reuse and rewinds.
        log: called with each notice when ``verbose`` (notices are also kept in :attr:`notices`).

    Use::

        session = ChatSession(model, tokenizer)
        for event in session.send("Why is the sky blue?"):
            ...                       # PassEvent / CommitEvent / EndEvent, as stream_generate
        session.messages              # [{"role": "user", ...}, {"role": "assistant", ...}]

    A ``KeyboardInterrupt`` during a reply ends it: ``send`` then yields a final
    ``EndEvent(finish_reason="cancelled")`` holding the answer text committed so far (kept in the
    conversation; nothing is kept when nothing was committed) and the session stays usable. If the
    consumer stops iterating instead (or is interrupted itself), close the iterator (e.g.
    ``contextlib.closing``) and the same clean-up happens.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        system: Optional[str] = None,
        think: bool = False,
        settings: Optional[GenerationSettings] = None,
        verbose: bool = False,
        log: Optional[Callable[[str], None]] = None,
    ):
        if not getattr(tokenizer, "has_chat_template", False):
            raise DGemmaError("this tokenizer has no chat template, which chat needs")
        self.model = model
        self.tokenizer = tokenizer
        self.verbose = verbose
        self.log = log
        self.notices: list[str] = []
        self._system = system or None
        self._think = bool(think)
        self._settings = settings if settings is not None else default_settings(model)
        self._settings.validate()
        self._messages: list[dict[str, str]] = []
        self._version = 0  # bumped whenever the conversation changes outside a turn
        self._busy = False
        self._turns: list[TurnStats] = []
        self._new_cache()

    # -- state -----------------------------------------------------------------------------------

    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation (user/assistant turns, answers without thoughts), as a copy."""
        return [dict(m) for m in self._messages]

    @property
    def system(self) -> Optional[str]:
        return self._system

    @property
    def think(self) -> bool:
        return self._think

    @property
    def settings(self) -> GenerationSettings:
        return self._settings

    @settings.setter
    def settings(self, value: GenerationSettings) -> None:
        value.validate()
        self._settings = value

    @property
    def ids(self) -> list[int]:
        """The token ids the cache holds (``len(ids) == cache.offset``)."""
        return list(self._ids)

    @property
    def context(self) -> int:
        return int(self.model.args.max_position_embeddings)

    @property
    def stats(self) -> ChatStats:
        return ChatStats(
            turns=len(self._turns),
            messages=len(self._messages),
            cache_tokens=self.cache.offset,
            cache_bytes=self.cache.nbytes,
            context=self.context,
            per_turn=tuple(self._turns),
            last_generation=self._turns[-1].generation if self._turns else None,
        )

    def conversation(self, messages: Optional[list[dict]] = None) -> list[dict[str, str]]:
        """The messages handed to the chat template: the system turn (if any), then the turns
        (images before the text of their message)."""
        messages = self._messages if messages is None else messages
        return ([{"role": "system", "content": self._system}] if self._system else []) + template_messages(messages)

    def render(self, messages: Optional[list[dict]] = None, *, add_generation_prompt: bool = True) -> list[int]:
        """The conversation (default: the current one) rendered by the chat template, as ids
        (image tokens expanded)."""
        ids = render_chat(
            self.tokenizer, self.conversation(messages), think=self._think, add_generation_prompt=add_generation_prompt
        )
        images = message_images(self._messages if messages is None else messages)
        return expand_image_tokens(ids, [im.num_tokens for im in images], self.model.args) if images else ids

    # -- settings --------------------------------------------------------------------------------

    def set_params(self, **values: Any) -> GenerationSettings:
        """Change sampling settings (validated; nothing changes on error). ``seed=None`` unsets
        the seed. Values may be strings (``steps="16"``)."""
        self._settings = _apply_settings(self._settings, values)
        return self._settings

    def set_system(self, text: Optional[str]) -> None:
        """Set (or clear with None / "") the system prompt; the next turn re-encodes from the
        first token that changed."""
        self._system = text if text and text.strip() else None

    def set_think(self, on: bool) -> None:
        """Turn thinking on or off for the next turns."""
        self._think = bool(on)

    def reset(self) -> None:
        """Forget the conversation and empty the cache (system prompt, thinking and settings stay)."""
        self._check_idle()
        self._messages = []
        self._turns = []
        self._version += 1
        self._new_cache()

    # -- turns -----------------------------------------------------------------------------------

    def send(
        self, text: str, images: Sequence[PromptImage] = (), *, warm_start=None, pinned=None
    ) -> Iterator[Event]:
        """Add a user turn (with ``images`` before its text, from
        :func:`~dgemma_mlx.multimodal.read_images`) and generate the reply; yields the events of
        :func:`~dgemma_mlx.generate.stream_generate`. The reply is recorded when the
        :class:`EndEvent` is produced. ``warm_start`` / ``pinned`` fix or seed reply positions as
        in :func:`~dgemma_mlx.generate.stream_generate`.

        Checks happen now (empty message, chat template, context overflow: raised as
        :class:`DGemmaError`); encoding and generation happen as the iterator is consumed.
        """
        self._check_idle()
        if not text or not text.strip():
            raise DGemmaError("the message is empty")
        user = {"role": "user", "content": text, **({"images": list(images)} if images else {})}
        messages = self._messages + [user]
        target = self.render(messages, add_generation_prompt=True)
        base = self.render(messages, add_generation_prompt=False)
        self._all_images = message_images(messages)
        check_image_context(self.model.args, 0, len(target), sum(im.num_tokens for im in self._all_images))
        self._check_room(len(target))
        # The conversation without the generation prompt is what the next turn shares: encode it,
        # checkpoint, then let generation encode the generation prompt. When the template does not
        # render it as a prefix, split at the common prefix (at least one token must remain).
        split = min(common_prefix(base, target), len(target) - 1)
        return self._turn(user, target, split, self._version, dict(warm_start=warm_start, pinned=pinned))

    def reply(self, text: str, images: Sequence[PromptImage] = (), **positions) -> EndEvent:
        """:meth:`send` run to the end; returns the final event."""
        end = None
        with closing(self.send(text, images, **positions)) as events:
            for event in events:
                end = event
        return end

    def prefill(self) -> int:
        """Bring the cache to the current conversation (rendered without a generation prompt)
        ahead of the next turn, e.g. after :meth:`load`; returns the number of tokens encoded."""
        self._check_idle()
        ids = self.render(add_generation_prompt=False)
        self._all_images = message_images(self._messages)
        self._check_room(len(ids))
        self._busy = True
        try:
            _, encoded, _ = self._sync(ids)
        except BaseException:
            self._restore()
            raise
        finally:
            self._busy = False
        return encoded

    # -- transcripts -----------------------------------------------------------------------------

    def transcript(self) -> dict[str, Any]:
        """The JSON-serialisable transcript :meth:`save` writes."""
        path = getattr(self.model, "path", None)
        return {
            "format": TRANSCRIPT_FORMAT,
            "version": TRANSCRIPT_VERSION,
            "model": str(path) if path is not None else None,
            "system": self._system,
            "think": self._think,
            "settings": self._settings.to_dict(),
            "messages": [{**m, "images": images_to_json(m["images"])} if m.get("images") else m for m in self.messages],
        }

    def save(self, path: PathLike) -> Path:
        """Write the transcript as JSON, atomically (a temporary file, then ``os.replace``)."""
        path = Path(path).expanduser()
        data = json.dumps(self.transcript(), indent=2, ensure_ascii=False) + "\n"
        atomic_write_text(path, data, what="save to")
        return path

    def load(self, path: PathLike) -> None:
        """Replace the conversation, system prompt, thinking and settings with a saved transcript.

        The file is fully validated first (nothing changes on error). The cache is kept: the next
        turn re-encodes from the first token where the loaded conversation differs from it.
        """
        self._check_idle()
        path = Path(path).expanduser()
        try:
            raw = path.read_text(encoding="utf-8")
        except OSError as e:
            raise DGemmaError(f"cannot read '{path}': {e.strerror or e}")
        except UnicodeDecodeError:
            raise DGemmaError(f"'{path}' is not a text file")
        try:
            data = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DGemmaError(f"'{path}' is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})")
        system, think, settings, messages = self._validate_transcript(data, path)
        self._system, self._think, self._settings = system, think, settings
        self._messages = messages
        self._turns = []
        self._version += 1
        model = data.get("model")
        here = getattr(self.model, "path", None)
        if model and here is not None and str(model) != str(here):
            self._notice(f"the transcript was saved with model {model}")

    def _validate_transcript(self, data: Any, path: Path):
        def bad(why: str) -> DGemmaError:
            return DGemmaError(f"'{path}' is not a dgemma chat transcript: {why}")

        if not isinstance(data, dict):
            raise bad("expected a JSON object")
        if data.get("format", TRANSCRIPT_FORMAT) != TRANSCRIPT_FORMAT:
            raise bad(f"format is {data.get('format')!r}")
        version = data.get("version", TRANSCRIPT_VERSION)
        if not isinstance(version, int) or version > TRANSCRIPT_VERSION:
            raise bad(f"unsupported version {version!r}")
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise bad("no 'messages' list")
        clean = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise bad(f"messages[{i}] needs a string 'content'")
            if m.get("role") not in ROLES:
                raise bad(f"messages[{i}] has role {m.get('role')!r} (expected user or assistant)")
            clean.append({"role": m["role"], "content": m["content"]})
            if m.get("images"):
                try:
                    clean[-1]["images"] = images_from_json(self.model, m["images"], f"messages[{i}]")
                except DGemmaError as e:
                    raise bad(str(e))
        system = data.get("system")
        if system is not None and not isinstance(system, str):
            raise bad("'system' must be a string or null")
        think = data.get("think", False)
        if not isinstance(think, bool):
            raise bad("'think' must be true or false")
        raw_settings = data.get("settings", {})
        if not isinstance(raw_settings, dict):
            raise bad("'settings' must be an object")
        try:
            settings = _apply_settings(default_settings(self.model), raw_settings)
        except DGemmaError as e:
            raise bad(str(e))
        return system or None, think, settings, clean

    # -- internals -------------------------------------------------------------------------------

    def _new_cache(self) -> None:
        self.cache = self.model.make_cache()
        self._ids: list[int] = []
        self._safe = 0  # a length the cache can always be restored to (a checkpoint, or 0)
        self._all_images: list[PromptImage] = []  # the images of the ids being synced
        self._cached_images: list[PromptImage] = []  # the images whose tokens the cache holds

    def _check_idle(self) -> None:
        if self._busy:
            raise DGemmaError("a reply is still being generated")

    def _check_room(self, n: int) -> None:
        block = int(self.model.args.canvas_length)
        if n + block > self.context:
            raise DGemmaError(
                f"the conversation ({n} tokens) leaves no room for a reply in the model's context of "
                f"{self.context} tokens; use /reset to start a new conversation"
            )

    def _notice(self, text: str) -> None:
        if not self.verbose:
            return
        self.notices.append(text)
        if self.log is not None:
            self.log(text)

    def _encode(self, ids: list[int], features: Optional[mx.array] = None) -> None:
        if ids:
            self.model.encode(mx.array(ids, dtype=mx.int32)[None], self.cache, image_features=features)

    def _restore(self) -> None:
        """Make the cache consistent after an interruption: an interrupted ``encode`` may have
        appended to some layers only, so every layer is rewound to the last safe checkpoint."""
        safe = min(self._safe, len(self._ids))
        n = self.cache.rewind(safe, force=True)
        del self._ids[n:]
        held = image_runs(np.asarray(self._ids), self.model.args.image_token_id)
        self._cached_images = self._cached_images[: len(held)]
        self._safe = n

    def _sync(self, ids: list[int]) -> tuple[int, int, Optional[int]]:
        """Make the cache hold exactly ``ids``, encoding only what it lacks, and checkpoint there.
        Returns ``(reused, encoded, rewound_from)``."""
        cached = len(self._ids)
        keys = [im.key for im in self._all_images]
        lcp, _ = resume_point(
            ids, keys, common_prefix(self._ids, ids), self.model.args, [im.key for im in self._cached_images]
        )
        keep, rewound_from = lcp, None
        if lcp < cached:
            rewound_from = cached
            checkpoint = self._safe
            keep = self.cache.rewind(lcp)
            del self._ids[keep:]
            self._safe = min(self._safe, keep)
            if lcp >= checkpoint:
                self._notice(
                    f"longest common prefix {lcp} of {cached} cached tokens: the template renders the last "
                    f"reply differently from how it was generated; rewound to the checkpoint at {keep} "
                    f"tokens, re-encoding {len(ids) - keep}"
                )
            else:
                self._notice(
                    f"the chat template rewrote earlier text: longest common prefix {lcp} of {cached} "
                    f"cached tokens; rewound the cache to {keep} tokens, re-encoding {len(ids) - keep}"
                )
        keep, first = resume_point(ids, keys, keep, self.model.args)
        new = ids[keep:]
        try:
            self._encode(new, features_of(self._all_images[first:]))
        except BaseException:
            self._restore()
            raise
        self._ids = list(ids)
        self._cached_images = list(self._all_images)
        self.cache.checkpoint()
        self._safe = len(ids)
        return keep, len(new), rewound_from

    def _turn(self, user: dict, target: list[int], split: int, version: int, positions: dict) -> Iterator[Event]:
        if version != self._version:
            raise DGemmaError("the conversation changed before this message was sent")
        self._check_idle()
        self._busy = True
        tokenizer = self.tokenizer
        splitter = ChannelSplitter(tokenizer, *channel_ids(tokenizer))
        prompt = target[split:]
        state = {"reused": 0, "encoded": 0, "rewound": None, "reply_encoded": 0, "tokens": [], "blocks": 0,
                 "steps": 0, "prompt_in": False, "prompt_len": len(prompt)}
        done = False
        try:
            reused, encoded, rewound = self._sync(target[:split])
            state.update(reused=reused, encoded=encoded, rewound=rewound)
            self._notice(
                f"turn {len(self._turns) + 1}: {len(target)} conversation tokens, {reused} reused from the "
                f"cache, encoding {len(target) - reused}"
            )
            for event in stream_generate(
                self.model, tokenizer, prompt, cache=self.cache, settings=self._settings, **positions
            ):
                if not state["prompt_in"]:
                    self._ids += prompt  # stream_generate encoded the generation prompt first
                    state["prompt_in"] = True
                if isinstance(event, CommitEvent):
                    splitter.feed(event.tokens)
                    state["tokens"] += event.tokens
                    state["blocks"] += 1
                    state["steps"] += event.steps
                    if event.encoded:
                        self._ids += event.tokens
                        state["reply_encoded"] += len(event.tokens)
                elif isinstance(event, EndEvent):
                    self._record(user, event, target, state)
                    done = True
                yield event
        except KeyboardInterrupt:
            end = self._cancel(user, target, state, splitter)
            done = True
            yield end
        finally:
            if not done:
                self._cancel(user, target, state, splitter)
            self._busy = False

    def _record(self, user: dict, end: EndEvent, target: list[int], state: dict) -> None:
        self._messages += [user, {"role": "assistant", "content": end.text.strip()}]
        self._turns.append(
            TurnStats(
                prompt_tokens=len(target),
                reused=state["reused"],
                encoded=len(target) - state["reused"],
                reply_encoded=state["reply_encoded"],
                rewound_from=state["rewound"],
                generated=len(end.tokens),
                finish_reason=end.finish_reason,
                generation=end.stats,
            )
        )

    def _cancel(self, user: dict, target: list[int], state: dict, splitter: ChannelSplitter) -> EndEvent:
        """Stop the turn: restore the cache and keep the committed answer (if any)."""
        self._restore()
        splitter.flush()
        answer = splitter.answer.strip()
        encoded = len(target) - state["reused"] if state["prompt_in"] else state["encoded"]
        stats = GenerationStats(
            prompt_tokens=state["prompt_len"],
            generated_tokens=len(state["tokens"]),
            blocks=state["blocks"],
            steps=state["steps"],
        )
        end = EndEvent(
            text=answer, tokens=list(state["tokens"]), finish_reason="cancelled", stats=stats, thought=splitter.thought
        )
        if answer:
            self._messages += [user, {"role": "assistant", "content": answer}]
            self._notice("reply interrupted: the answer committed so far was kept")
        else:
            self._notice("reply interrupted before any answer text: the message was not added")
        self._turns.append(
            TurnStats(
                prompt_tokens=len(target),
                reused=state["reused"],
                encoded=encoded,
                reply_encoded=state["reply_encoded"],
                rewound_from=state["rewound"],
                generated=len(state["tokens"]),
                finish_reason="cancelled",
                generation=stats,
            )
        )
        return end


# ------------------------------------------------------------------------------------------ REPL


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
  /params [NAME=VALUE …] show or set sampling settings, e.g. /params steps=16 t_max=0.9 seed=none
  /save FILE             save the transcript as JSON
  /load FILE             load a transcript (replaces the conversation)
  /stats                 cache and speed statistics
  /image PATH            attach an image to your next message (repeatable)
  /exit                  leave (Ctrl-D also leaves)
Ctrl-C stops a reply and keeps the conversation. Start a message with // to send a literal '/'."""

_EXIT = object()


class _ThoughtFilter:
    """Drops the thought channel from commit/end tokens, so a view shows only the answer."""

    def __init__(self, start: int, end: int, on_thought: Optional[Callable[[], None]] = None):
        self.start, self.end = start, end
        self.on_thought = on_thought
        self.inside = False
        self.seen = False
        self.kept: list[int] = []

    def _filter(self, tokens: list[int]) -> list[int]:
        out = []
        for t in tokens:
            if t == self.start:
                if not self.seen and self.on_thought is not None:
                    self.on_thought()
                self.inside = self.seen = True
            elif t == self.end and self.inside:
                self.inside = False
            elif not self.inside:
                out.append(t)
        return out

    def __call__(self, event: Event) -> Event:
        if isinstance(event, CommitEvent):
            tokens = self._filter(event.tokens)
            self.kept += tokens
            return replace(event, tokens=tokens)
        if isinstance(event, EndEvent):
            return replace(event, tokens=list(self.kept), thought="")
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
            :func:`default_history_file`; None keeps it in memory).
        show_thoughts: show thoughts (dim) or collapse them to one line (``/think show|hide``).
        view_factory: ``view_factory(tokenizer, console)`` -> a view (tests).
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
        self.view_factory = view_factory
        self._input_fn = input_fn
        self._history_file = default_history_file() if history_file is True else history_file
        self._channels = channel_ids(session.tokenizer)
        self.image_tokens = check_budget(image_tokens)
        self.pending: list[PromptImage] = read_images(session.model, list(images), image_tokens) if images else []
        if session.log is None:
            session.log = lambda text: self.console.print(text, style="dim", markup=False, highlight=False)

    # -- output ----------------------------------------------------------------------------------

    def say(self, text: str, style: Optional[str] = None) -> None:
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
            line = sys.stdin.readline()
            if not line:
                raise EOFError
            return line.rstrip("\n")

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
            self.say(" ".join(f"{k}={v}" for k, v in s.settings.to_dict().items()))
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

    def _view(self):
        from .render import LiveView, PlainView

        tokenizer = self.session.tokenizer
        start, end = self._channels
        if self.view_factory is not None:
            return self.view_factory(tokenizer, self.console)
        if self.console.is_terminal:
            return LiveView(tokenizer, self.console, channel_start_id=start, channel_end_id=end)
        return PlainView(tokenizer, self.console.file, channel_start_id=start, channel_end_id=end)

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
        view = self._view()
        hide = None
        if not self.show_thoughts:
            marker = None
            if self.console.is_terminal:
                marker = lambda: self.say("(thinking… hidden: /think show)", style="dim")  # noqa: E731
            hide = _ThoughtFilter(*self._channels, on_thought=marker)
        end = None
        interrupted = False
        try:
            with closing(events), view:
                for event in events:
                    if hide is not None:
                        event = hide(event)
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
            f"{g.generated_tokens} tokens · {_plural(g.blocks, 'block')} · {_plural(g.steps, 'pass', 'passes')}"
            f" · {g.generation_tps:.1f} tok/s"
            f" · encoded {turn.encoded} new of {turn.prompt_tokens} conversation tokens"
            f" · cache {s.cache.offset}/{s.context}"
        )
        return None


def _plural(n: int, one: str, many: Optional[str] = None) -> str:
    return f"{n} {one if n == 1 else (many or one + 's')}"


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
