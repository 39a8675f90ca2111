"""Chat transcripts: the JSON file ``/save`` writes and ``/load`` reads.

A transcript holds the conversation (user and assistant turns, answers without thoughts), the
system prompt, whether thinking is on, the sampling settings and the model it was made with::

    {"format": "dgemma-chat", "version": 1, "model": "...", "system": null, "think": false,
     "settings": {"steps": 48, ...}, "messages": [{"role": "user", "content": "..."}, ...]}

A user message with images records each image's file and budget
(``"images": [{"path": "...", "image_tokens": 280}]``); loading reads and encodes them again.

Files are written atomically and read with full validation: a bad file is one clear error and
changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import DGemmaError
from ..files import PathLike, atomic_write_text
from ..multimodal import images_from_json, images_to_json
from ..settings import GenerationSettings

TRANSCRIPT_FORMAT = "dgemma-chat"
TRANSCRIPT_VERSION = 1
ROLES = ("user", "assistant")


@dataclass(frozen=True)
class Transcript:
    """A saved conversation (see the module docstring for the file format)."""

    messages: list[dict[str, str]]
    settings: GenerationSettings
    system: Optional[str] = None
    think: bool = False
    model: Optional[str] = None

    def to_json(self) -> dict[str, Any]:
        return {
            "format": TRANSCRIPT_FORMAT,
            "version": TRANSCRIPT_VERSION,
            "model": self.model,
            "system": self.system,
            "think": self.think,
            "settings": self.settings.to_dict(),
            "messages": [
                {**m, "images": images_to_json(m["images"])} if m.get("images") else dict(m) for m in self.messages
            ],
        }


def save_transcript(transcript: Transcript, path: PathLike) -> Path:
    """Write ``transcript`` as JSON to ``path``, atomically."""
    data = json.dumps(transcript.to_json(), indent=2, ensure_ascii=False) + "\n"
    return atomic_write_text(path, data, what="save to")


def read_transcript(path: PathLike, defaults: GenerationSettings, model=None) -> Transcript:
    """Read and validate a transcript; settings it lacks come from ``defaults``. Recorded images
    are read and encoded again for ``model`` (None: a transcript with images is an error)."""
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
    except RecursionError:
        raise DGemmaError(f"'{path}' is not a dgemma chat transcript: nested too deeply")
    return parse_transcript(data, defaults, path, model)


def parse_transcript(data: Any, defaults: GenerationSettings, path: PathLike = "transcript", model=None) -> Transcript:
    """A :class:`Transcript` from decoded JSON, or a :class:`DGemmaError` saying what is wrong
    (images are read back for ``model``, as in :func:`read_transcript`)."""

    def bad(why: str) -> DGemmaError:
        return DGemmaError(f"'{path}' is not a dgemma chat transcript: {why}")

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    if data.get("format", TRANSCRIPT_FORMAT) != TRANSCRIPT_FORMAT:
        raise bad(f"format is {data.get('format')!r}")
    version = data.get("version", TRANSCRIPT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > TRANSCRIPT_VERSION:
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
            if model is None:
                raise bad(f"messages[{i}] has images, which need a model to read them")
            try:
                clean[-1]["images"] = images_from_json(model, m["images"], f"messages[{i}]")
            except DGemmaError as e:
                raise bad(str(e))
    system = data.get("system")
    if system is not None and not isinstance(system, str):
        raise bad("'system' must be a string or null")
    think = data.get("think", False)
    if not isinstance(think, bool):
        raise bad("'think' must be true or false")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("'model' must be a string or null")
    settings = data.get("settings", {})
    if not isinstance(settings, dict):
        raise bad("'settings' must be an object")
    try:
        settings = defaults.update(**{str(k): (-1 if k == "seed" and v is None else v) for k, v in settings.items()})
    except DGemmaError as e:
        raise bad(str(e))
    return Transcript(messages=clean, settings=settings, system=system or None, think=think, model=model)
