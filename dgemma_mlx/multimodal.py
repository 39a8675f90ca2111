"""Images in prompts: from files to soft tokens merged into the encoder's input.

* :func:`read_images` reads and processes image files (or Pillow images) and runs the vision
  tower once per image, giving :class:`PromptImage` s (their embeddings in the text model's space).
* :func:`build_image_prompt` renders a user prompt with the images placed before the text (as
  Google recommends) through the chat template, which writes one image placeholder per image;
  :func:`expand_image_tokens` replaces each placeholder with ``boi, image * n, eoi`` as the
  reference processor does.
* ``Model.encode(ids, cache, image_features=...)`` then merges the embeddings at the image-token
  positions (:func:`encode_chunks`): each image's tokens attend to each other bidirectionally,
  everything else stays causal (``use_bidirectional_attention="vision"``).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .errors import DGemmaError
from .image_processing import DEFAULT_IMAGE_TOKENS, ProcessedImage, check_budget, load_image, process_image

ImageSource = Union[str, os.PathLike, ProcessedImage, "PIL.Image.Image"]  # noqa: F821


@dataclass(frozen=True)
class PromptImage:
    """One image, encoded: ``features`` [num_tokens, H] in the text model's embedding space.
    ``key`` identifies the image's content (:func:`image_key`; unique by default): a prefix cache
    reuses an image's tokens only for the same key."""

    features: mx.array
    source: str = ""
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    max_soft_tokens: int = DEFAULT_IMAGE_TOKENS  # the budget it was processed with

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


def has_vision(model) -> bool:
    return getattr(model, "vision_tower", None) is not None


def require_vision(model) -> None:
    if not has_vision(model):
        raise DGemmaError(
            "this checkpoint is text-only (no vision tower): it cannot read images; use a DiffusionGemma "
            "checkpoint with its vision tower (converted without --text-only; the bundled models have none)"
        )


def image_key(image: ProcessedImage) -> str:
    """A digest of the processed image (same pixels at the same budget: same key)."""
    h = hashlib.sha1(np.ascontiguousarray(image.pixel_values).tobytes())
    h.update(np.ascontiguousarray(image.position_ids).tobytes())
    return h.hexdigest()


def encode_image(model, image: ProcessedImage, source: str = "image") -> PromptImage:
    budget = len(image.pixel_values) // model.args.vision.pooling_kernel_size**2 if has_vision(model) else 0
    return PromptImage(image_features(model, image), source, image_key(image), budget)


def image_features(model, image: ProcessedImage) -> mx.array:
    """The vision tower and ``embed_vision`` over one processed image: [num_soft_tokens, H]."""
    require_vision(model)
    soft = model.vision_tower(image.pixel_values, image.position_ids)
    features = model.embed_vision(soft)
    mx.eval(features)
    return features


def read_images(
    model, sources: Sequence[ImageSource], max_soft_tokens: int = DEFAULT_IMAGE_TOKENS
) -> list[PromptImage]:
    """Read, process and encode each image once (paths, Pillow images or :class:`ProcessedImage`)."""
    check_budget(max_soft_tokens)
    if sources:
        require_vision(model)
    v = model.args.vision if sources else None
    out = []
    for src in sources:
        if isinstance(src, ProcessedImage):
            processed, name = src, "image"
        else:
            name = str(src) if isinstance(src, (str, os.PathLike)) else "image"
            image = load_image(src) if isinstance(src, (str, os.PathLike)) else src
            processed = process_image(
                image, max_soft_tokens, patch_size=v.patch_size, pooling_kernel_size=v.pooling_kernel_size
            )
        out.append(encode_image(model, processed, name))
    return out


def image_content(n_images: int, text: str) -> Union[str, list[dict]]:
    """A user message's content with ``n_images`` images before the text (plain text if none)."""
    if not n_images:
        return text
    return [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]


def expand_image_tokens(ids: Sequence[int], counts: Sequence[int], args) -> list[int]:
    """Replace the i-th image placeholder of ``ids`` with ``boi, image * counts[i], eoi``."""
    img = args.image_token_id
    found = sum(1 for t in ids if t == img)
    if found != len(counts):
        raise DGemmaError(
            f"the prompt has {found} image placeholder(s) for {len(counts)} image(s); the chat template "
            "must write one image token per image"
        )
    out: list[int] = []
    it = iter(counts)
    for t in ids:
        if t == img:
            out += [args.boi_token_id] + [img] * next(it) + [args.eoi_token_id]
        else:
            out.append(int(t))
    return out


def build_image_prompt(
    model,
    tokenizer,
    prompt: str,
    images: Sequence[PromptImage],
    *,
    system: Optional[str] = None,
    think: bool = False,
    chat_template: bool = True,
) -> list[int]:
    """Token ids for ``prompt`` with ``images`` before the text, image tokens expanded."""
    from .generate import build_prompt, render_chat

    if not images:
        return build_prompt(tokenizer, prompt, system=system, think=think, chat_template=chat_template)
    if not prompt or not prompt.strip():
        raise DGemmaError("the prompt is empty")
    args = model.args
    if chat_template and getattr(tokenizer, "has_chat_template", False):
        build_prompt(tokenizer, prompt, system=system, think=think)  # the same checks as text
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": image_content(len(images), prompt)}
        ]
        ids = render_chat(tokenizer, messages, think=think)
    else:
        text = list(build_prompt(tokenizer, prompt, system=system, chat_template=False))
        head = text[:1] if text and text[0] == args.bos_token_id else []
        ids = head + [args.image_token_id] * len(images) + text[len(head) :]
    return expand_image_tokens(ids, [im.num_tokens for im in images], args)


def check_image_context(args, offset: int, n_ids: int, n_image_tokens: int) -> None:
    """Raise when the prompt's image tokens leave no room for a block in the context."""
    C, context = args.canvas_length, args.max_position_embeddings
    if n_image_tokens and offset + n_ids + C > context:
        raise DGemmaError(
            f"too many image tokens for the context: the prompt takes {offset + n_ids} tokens "
            f"({n_image_tokens} of them for images) and a {C}-token block must fit in the model's "
            f"{context}; use fewer images or a smaller --image-tokens"
        )


def image_runs(ids: np.ndarray, image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of consecutive image tokens (one run per image)."""
    is_img = np.concatenate([[False], ids == image_token_id, [False]])
    edges = np.flatnonzero(is_img[1:] != is_img[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


@dataclass(frozen=True)
class ChunkImages:
    """The images of one encoded chunk: ``features`` [n, H] go at the chunk's ``positions`` [n];
    ``groups`` [l] gives each token's image (-1 for text)."""

    positions: mx.array
    features: mx.array
    groups: mx.array


def encode_chunks(model, ids: mx.array, features: mx.array, step: int) -> Iterator[tuple[mx.array, Optional[ChunkImages]]]:
    """Chunks of ``ids`` [1, L] for :meth:`Model.encode`, each with its :class:`ChunkImages` (None
    when it has no image token). A chunk is extended so that it never splits an image."""
    if ids.shape[0] != 1:
        raise DGemmaError("prompts with images are encoded one sequence at a time (batch size 1)")
    flat = np.array(ids[0])
    runs = image_runs(flat, model.args.image_token_id)
    n = sum(b - a for a, b in runs)
    if n != features.shape[0]:
        raise DGemmaError(f"the prompt has {n} image tokens but {features.shape[0]} image features were given")
    groups = np.full(len(flat), -1, np.int32)
    row = np.zeros(len(flat), np.int64)
    used = 0
    for g, (a, b) in enumerate(runs):
        groups[a:b] = g
        row[a:b] = np.arange(used, used + b - a)
        used += b - a
    start = 0
    while start < len(flat):
        end = min(start + step, len(flat))
        if end < len(flat) and groups[end] >= 0 and groups[end - 1] == groups[end]:
            end = next(b for a, b in runs if a < end < b)
        local = np.flatnonzero(groups[start:end] >= 0)
        images = None
        if len(local):
            rows = mx.array(row[start:end][local])
            images = ChunkImages(mx.array(local), features[rows], mx.array(groups[start:end]))
        yield ids[:, start:end], images
        start = end


def message_images(messages: Sequence[dict]) -> list[PromptImage]:
    """The images of ``messages`` (their ``"images"`` lists), in conversation order."""
    return [im for m in messages for im in m.get("images") or ()]


def template_messages(messages: Sequence[dict]) -> list[dict]:
    """``messages`` for the chat template: a message with ``"images"`` gets a content list with
    the images before its text."""
    out = []
    for m in messages:
        m = dict(m)
        images = m.pop("images", None)
        if images:
            m["content"] = image_content(len(images), m["content"])
        out.append(m)
    return out


def resume_point(
    ids: Sequence[int], keys: Sequence[str], keep: int, args, cached_keys: Optional[Sequence[str]] = None
) -> tuple[int, int]:
    """Where to resume encoding ``ids`` (whose image runs hold the images ``keys``) when the cache
    holds ``ids[:keep]`` with the images ``cached_keys``: moved back to the first image that
    differs from the cached one (image tokens alone cannot tell two images apart) and to the start
    of an image that ``keep`` would split. Returns ``(keep, first)``: the images from index
    ``first`` on must be encoded."""
    runs = image_runs(np.asarray(ids), args.image_token_id)
    if cached_keys is not None:
        for i, ((a, _), key) in enumerate(zip(runs, keys)):
            if a < keep and (i >= len(cached_keys) or cached_keys[i] != key):
                keep = a
                break
    for a, b in runs:
        if a < keep < b:
            keep = a
    return keep, sum(1 for a, _ in runs if a < keep)


def features_of(images: Sequence[PromptImage]) -> Optional[mx.array]:
    """The images' features, concatenated (None for no image)."""
    return mx.concatenate([im.features for im in images]) if images else None


def images_to_json(images: Sequence[PromptImage]) -> list[dict]:
    """How a transcript records images: their file and budget."""
    return [{"path": im.source, "image_tokens": im.max_soft_tokens} for im in images]


def images_from_json(model, value: Any, where: str) -> list[PromptImage]:
    """Read back the images :func:`images_to_json` recorded (files read and encoded again)."""
    if not isinstance(value, list) or not all(
        isinstance(v, dict) and isinstance(v.get("path"), str) and isinstance(v.get("image_tokens", 0), int)
        for v in value
    ):
        raise DGemmaError(f"{where}: 'images' must be a list of {{\"path\", \"image_tokens\"}} objects")
    return [read_images(model, [v["path"]], v.get("image_tokens", DEFAULT_IMAGE_TOKENS))[0] for v in value]
