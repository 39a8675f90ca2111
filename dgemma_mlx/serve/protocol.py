"""The OpenAI wire format: request parsing and validation, response and error bodies.

Requests are checked field by field so that a bad value is reported as OpenAI reports it: a 4xx
status and ``{"error": {"message", "type", "param", "code"}}``. The standard fields used are
``model``, ``messages`` / ``prompt``, ``max_tokens`` (or ``max_completion_tokens``), ``seed``,
``stream``, ``stream_options``, ``stop`` and ``n`` (1); DiffusionGemma's own settings come as extra
body fields: ``steps``, ``entropy_bound``, ``t_min``, ``t_max``, the opt-in fast sampling
``top_k`` (vLLM's field; -1 or 0: off), ``freeze_accepted`` and ``short_canvas``, and (chat) ``think`` and
``image_tokens``. User messages may carry ``image_url`` parts: data URLs (base64) or local paths
(``file://`` or plain); remote URLs are never fetched. Other OpenAI fields (``temperature``,
``top_p``, penalties, ``user`` ...) are accepted and ignored, as vLLM does; requests that need
something this server cannot do (``n`` > 1, ``logprobs``, tools, remote images, ``echo``) are
refused rather than silently answered differently.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..errors import DGemmaError
from ..generate import GenerationSettings
from ..image_processing import DEFAULT_IMAGE_TOKENS, check_budget

MAX_STOP = 4
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = " ".join(str(message).split())
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# ------------------------------------------------------------------------------------- requests


@dataclass
class GenerationRequest:
    """What both endpoints share.

    Attributes:
        settings: the sampling settings (the server's defaults with the request's values applied).
        stream: answer as server-sent events.
        include_usage: a final chunk carrying ``usage`` (``stream_options.include_usage``).
        include_drafts: a draft chunk per denoising pass (``stream_options.include_drafts``).
        stop: strings that end the answer (not included in it).
        max_tokens: the token limit the request gave (None: the default), also in ``settings``.
    """

    settings: GenerationSettings
    stream: bool = False
    include_usage: bool = False
    include_drafts: bool = False
    stop: list[str] = field(default_factory=list)
    max_tokens: Optional[int] = None


@dataclass(frozen=True)
class ImageRef:
    """An ``image_url`` part, not yet read: ``data`` (a data URL's bytes) or ``path`` (local);
    ``param`` names it in errors."""

    param: str
    data: Optional[bytes] = None
    path: Optional[str] = None


@dataclass
class ChatRequest(GenerationRequest):
    """``messages`` as the chat template takes them (``{"role", "content"}`` with string content,
    plus ``"images"``: :class:`ImageRef` s, for user messages with image parts)."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    think: bool = False
    image_tokens: int = DEFAULT_IMAGE_TOKENS


@dataclass
class CompletionRequest(GenerationRequest):
    """``prompt`` is raw text (tokenized with the tokenizer's BOS) or token ids; ``suffix`` the text
    after the completion point (infilling) or None."""

    prompt: Union[str, list[int]] = ""
    suffix: Optional[str] = None


def parse_chat(body: Any, model_id: str, defaults: GenerationSettings) -> ChatRequest:
    """Validate a ``/v1/chat/completions`` body; raises :class:`APIError`."""
    body = _common_checks(body, model_id)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array of messages", "messages")
    clean = [_message(m, i) for i, m in enumerate(messages)]
    if not any(m["role"] == "user" for m in clean):
        raise bad_request("'messages' needs at least one user message", "messages")
    if body.get("tools"):
        raise bad_request("tools are not supported by this model server", "tools")
    for name in ("logprobs", "top_logprobs"):
        if body.get(name):
            raise bad_request(f"'{name}' is not supported by this model server", name)
    think = _optional(body, "think", bool, default=False)
    image_tokens = _optional(body, "image_tokens", int, default=DEFAULT_IMAGE_TOKENS)
    try:
        check_budget(image_tokens)
    except DGemmaError as e:
        raise bad_request(str(e), "image_tokens")
    return ChatRequest(messages=clean, think=think, image_tokens=image_tokens, **_generation_fields(body, defaults))


def parse_completion(body: Any, model_id: str, defaults: GenerationSettings) -> CompletionRequest:
    """Validate a ``/v1/completions`` body; raises :class:`APIError`."""
    body = _common_checks(body, model_id)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise bad_request("'prompt' must be a string, or an array of token ids (one prompt per request)", "prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise bad_request("'prompt' must be a non-empty string (one prompt per request)", "prompt")
    if body.get("echo"):
        raise bad_request("'echo' is not supported by this model server", "echo")
    if body.get("logprobs") not in (None, 0):
        raise bad_request("'logprobs' is not supported by this model server", "logprobs")
    if body.get("best_of") not in (None, 1):
        raise bad_request("'best_of' must be 1", "best_of")
    suffix = _optional(body, "suffix", str)
    return CompletionRequest(prompt=prompt, suffix=suffix or None, **_generation_fields(body, defaults))


def _common_checks(body: Any, model_id: str) -> dict:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' is required (GET /v1/models lists it)", "model")
    if model != model_id:
        raise APIError(
            404, f"The model '{model}' does not exist; this server serves '{model_id}'", param="model",
            code="model_not_found",
        )
    n = body.get("n")
    if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n != 1):
        raise bad_request("'n' must be 1: one choice per request", "n")
    return body


def _message(m: Any, i: int) -> dict[str, str]:
    param = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad_request(f"{param} must be an object with 'role' and 'content'", param)
    role = m.get("role")
    if role not in CHAT_ROLES:
        raise bad_request(
            f"{param}.role {role!r} is not supported (expected one of {', '.join(CHAT_ROLES)})", f"{param}.role"
        )
    content = m.get("content")
    images: list[ImageRef] = []
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "image_url":
                if CHAT_ROLES[role] != "user":
                    raise bad_request(f"{param}.content: images are accepted in user messages only", f"{param}.content")
                images.append(_image_ref(part.get("image_url"), f"{param}.content[{j}]", f"{param}.content"))
                continue
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(
                    f"{param}.content: only text and image_url parts are supported (got {kind!r})", f"{param}.content"
                )
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad_request(f"{param}.content must be a string or an array of text parts", f"{param}.content")
    message: dict[str, Any] = {"role": CHAT_ROLES[role], "content": content}
    if images:
        message["images"] = images
    return message


def _image_ref(value: Any, where: str, param: str) -> ImageRef:
    """An ``image_url`` part's value (``{"url": ...}`` or a string) as an :class:`ImageRef`."""
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}: image_url needs a 'url' string", param)
    if url.startswith("data:"):
        header, sep, payload = url[5:].partition(",")
        if not sep or not header.startswith("image/") or not header.endswith(";base64"):
            raise bad_request(f"{where}: a data URL must be 'data:image/...;base64,<data>'", param)
        try:
            return ImageRef(param, data=base64.b64decode(payload, validate=True))
        except (binascii.Error, ValueError):
            raise bad_request(f"{where}: the data URL is not valid base64", param)
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https", "ftp"):
        raise bad_request(f"{where}: remote image URLs are not fetched; send a data URL or a local path", param)
    return ImageRef(param, path=url[len("file://"):] if scheme == "file" else url)


def _optional(body: dict, name: str, kind: type, default: Any = None) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        ok, value = True, float(value)
    if not ok:
        names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "an object"}
        raise bad_request(f"'{name}' must be {names[kind]}", name)
    return value


def _generation_fields(body: dict, defaults: GenerationSettings) -> dict[str, Any]:
    stream = _optional(body, "stream", bool, default=False)
    options = _optional(body, "stream_options", dict, default=None)
    if options is not None and not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", "stream_options")
    options = options or {}
    for name in ("include_usage", "include_drafts"):
        if options.get(name) is not None and not isinstance(options.get(name), bool):
            raise bad_request(f"'stream_options.{name}' must be true or false", f"stream_options.{name}")
    max_tokens, param = _optional(body, "max_completion_tokens", int), "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = _optional(body, "max_tokens", int), "max_tokens"
    return dict(
        settings=_settings(body, defaults, max_tokens, param),
        max_tokens=max_tokens,
        stream=stream,
        include_usage=bool(options.get("include_usage")),
        include_drafts=bool(options.get("include_drafts")),
        stop=_stop(body.get("stop")),
    )


def _settings(body: dict, defaults: GenerationSettings, max_tokens: Optional[int], param: str) -> GenerationSettings:
    values = {
        "max_new_tokens": (param, max_tokens),
        "steps": ("steps", _optional(body, "steps", int)),
        "entropy_bound": ("entropy_bound", _optional(body, "entropy_bound", float)),
        "seed": ("seed", _optional(body, "seed", int)),
        "freeze_accepted": ("freeze_accepted", _optional(body, "freeze_accepted", bool)),
        "short_canvas": ("short_canvas", _optional(body, "short_canvas", bool)),
    }
    top_k = _optional(body, "top_k", int)
    if top_k is not None and top_k > 0:  # vLLM's field: -1 or 0 means the whole vocabulary
        values["top_k"] = ("top_k", top_k)
    seed = values["seed"][1]
    if seed is not None and not 0 <= seed < 2**64:
        raise bad_request("'seed' must be between 0 and 2**64 - 1", "seed")
    settings = defaults
    for key, (name, value) in values.items():
        try:
            settings = settings.update(**{key: value})
        except DGemmaError as e:
            raise bad_request(f"'{name}': {e}", name)
    t_min, t_max = _optional(body, "t_min", float), _optional(body, "t_max", float)
    try:
        return settings.update(t_min=t_min, t_max=t_max)
    except DGemmaError as e:
        raise bad_request(str(e), "t_min" if t_min is not None else "t_max")


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad_request("'stop' must be a string or an array of strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad_request(f"'stop' takes at most {MAX_STOP} sequences", "stop")
    return [s for s in stops if s]


# ------------------------------------------------------------------------------------ responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int, passes: int, blocks: int) -> dict:
    """OpenAI's ``usage`` with DiffusionGemma's pass counts (``passes``, ``tokens_per_pass``)."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "passes": passes,
        "blocks": blocks,
        "tokens_per_pass": round(completion_tokens / passes, 4) if passes else 0.0,
    }


@dataclass(frozen=True)
class ResponseShape:
    """The ids and object names of one response (chat or text completion)."""

    chat: bool
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, chat: bool, model: str) -> "ResponseShape":
        return cls(chat, model, new_id("chatcmpl" if chat else "cmpl"), now())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def full(self, content: str, reasoning: str, finish_reason: str, use: dict) -> dict:
        """The non-streamed response."""
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if reasoning:
                message["reasoning_content"] = reasoning
            choice = {"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": content, "finish_reason": finish_reason, "logprobs": None}
            obj = "text_completion"
        return {**self._head(obj), "choices": [choice], "usage": use}

    def chunk(self, delta: Optional[dict[str, str]] = None, finish_reason: Optional[str] = None) -> dict:
        """A streamed chunk: ``delta`` holds ``content`` / ``reasoning_content`` (chat) or ``text``."""
        delta = delta or {}
        if self.chat:
            choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        else:
            text = delta.get("content", "")
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return {**self._head(self.chunk_object), "choices": [choice]}

    def usage_chunk(self, use: dict) -> dict:
        return {**self._head(self.chunk_object), "choices": [], "usage": use}

    def draft_chunk(self, draft: dict) -> dict:
        """A pass of the refinement: no choices (clients that do not know drafts skip it)."""
        return {**self._head(self.chunk_object), "choices": [], "draft": draft}
