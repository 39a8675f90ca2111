"""A multi-turn chat session that never re-reads the conversation.

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
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.utils import common_prefix_len

from ..errors import DGemmaError
from ..events import CommitEvent, EndEvent, Event, GenerationStats
from ..files import PathLike
from ..generate import default_settings, render_chat, stream_generate
from ..multimodal import (
    PromptImage,
    check_image_context,
    expand_image_tokens,
    features_of,
    image_runs,
    message_images,
    resume_point,
    template_messages,
)
from ..settings import RANDOM_SEED, GenerationSettings
from .stats import ChatStats, TurnStats, TurnProgress
from .transcript import Transcript, read_transcript, save_transcript

__all__ = ["ChatSession", "ChatStats", "TurnStats"]


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
        the seed (so does ``seed=-1``). Values may be strings (``steps="16"``); a bad value raises
        :class:`~dgemma_mlx.settings.SettingError` naming its setting."""
        if "seed" in values and values["seed"] is None:
            values["seed"] = RANDOM_SEED
        self._settings = self._settings.update(**values)
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
        split = min(common_prefix_len(base, target), len(target) - 1)
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
        return Transcript(
            messages=self.messages, settings=self._settings, system=self._system, think=self._think,
            model=str(path) if path is not None else None,
        ).to_json()

    def save(self, path: PathLike) -> Path:
        """Write the transcript as JSON, atomically (a temporary file, then ``os.replace``)."""
        model = getattr(self.model, "path", None)
        transcript = Transcript(
            self.messages, self._settings, self._system, self._think, str(model) if model is not None else None
        )
        return save_transcript(transcript, path)

    def load(self, path: PathLike) -> None:
        """Replace the conversation, system prompt, thinking and settings with a saved transcript.

        The file is fully validated first (nothing changes on error). The cache is kept: the next
        turn re-encodes from the first token where the loaded conversation differs from it.
        """
        self._check_idle()
        t = read_transcript(path, default_settings(self.model), self.model)
        self._system, self._think, self._settings = t.system, t.think, t.settings
        self._messages = [dict(m) for m in t.messages]
        self._turns = []
        self._version += 1
        here = getattr(self.model, "path", None)
        if t.model and here is not None and t.model != str(here):
            self._notice(f"the transcript was saved with model {t.model}")

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
            ids, keys, common_prefix_len(self._ids, ids), self.model.args, [im.key for im in self._cached_images]
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
        prompt = target[split:]
        turn = TurnProgress(user=user, target=target, prompt_len=len(prompt))
        done = False
        try:
            turn.reused, turn.encoded, turn.rewound = self._sync(target[:split])
            self._notice(
                f"turn {len(self._turns) + 1}: {len(target)} conversation tokens, {turn.reused} reused from the "
                f"cache, encoding {len(target) - turn.reused}"
            )
            for event in stream_generate(
                self.model, self.tokenizer, prompt, cache=self.cache, settings=self._settings, **positions
            ):
                if not turn.prompt_in:
                    self._ids += prompt  # stream_generate encoded the generation prompt first
                    turn.prompt_in = True
                if isinstance(event, CommitEvent):
                    turn.add(event)
                    if event.encoded:
                        self._ids += event.tokens
                        turn.reply_encoded += len(event.tokens)
                elif isinstance(event, EndEvent):
                    self._record(turn, event)
                    done = True
                yield event
        except KeyboardInterrupt:
            end = self._cancel(turn)
            done = True
            yield end
        finally:
            if not done:
                self._cancel(turn)
            self._busy = False

    def _record(self, turn: TurnProgress, end: EndEvent) -> None:
        self._messages += [turn.user, {"role": "assistant", "content": end.text.strip()}]
        self._turns.append(turn.stats(end.finish_reason, len(end.tokens), end.stats))

    def _cancel(self, turn: TurnProgress) -> EndEvent:
        """Stop the turn: restore the cache and keep the committed answer (if any)."""
        self._restore()
        answer = turn.answer.strip()
        stats = GenerationStats(
            prompt_tokens=turn.prompt_len, generated_tokens=len(turn.tokens), blocks=turn.blocks, steps=turn.steps
        )
        end = EndEvent(text=answer, tokens=list(turn.tokens), finish_reason="cancelled", stats=stats, thought=turn.thought)
        if answer:
            self._messages += [turn.user, {"role": "assistant", "content": answer}]
            self._notice("reply interrupted: the answer committed so far was kept")
        else:
            self._notice("reply interrupted before any answer text: the message was not added")
        self._turns.append(turn.stats("cancelled", len(turn.tokens), stats))
        return end
