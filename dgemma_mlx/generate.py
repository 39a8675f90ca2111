"""Block-by-block generation.

The prompt is encoded into the prefix cache once. Then, block after block, a canvas of uniform
random ids is refined by denoising passes (:func:`dgemma_mlx.refine.refine_block`) until the
stable-and-confident criterion stops it or ``steps`` passes are done; its argmax is committed.
Generation ends at the first EOS token or after ``max_new_tokens``; otherwise the committed block
is encoded into the cache (once: the prefix is never re-encoded) and the next canvas begins.

:func:`stream_generate` yields typed events (:mod:`dgemma_mlx.events`); :func:`generate` runs the
stream to the end and returns its :class:`~dgemma_mlx.events.EndEvent`.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .cache import PrefixCache
from .channels import ChannelSplitter, text_of
from .errors import DGemmaError
from .events import CommitEvent, EndEvent, Event, GenerationStats, PassEvent
from .refine import initial_canvas, refine_block
from .settings import GenerationSettings


def default_settings(model) -> GenerationSettings:
    """The checkpoint's settings (``generation_config.json``) over the reference defaults."""
    return GenerationSettings.from_generation_config(getattr(model, "generation_config", None))


def build_prompt(
    tokenizer,
    prompt: str,
    *,
    system: Optional[str] = None,
    think: bool = False,
    chat_template: bool = True,
) -> list[int]:
    """Token ids for a user prompt: through the tokenizer's chat template (``enable_thinking`` =
    ``think``), or the raw text (with the tokenizer's BOS) when ``chat_template`` is False or the
    tokenizer has none (a base model, such as the bundled ``pycode``: it continues text)."""
    if not prompt or not prompt.strip():
        raise DGemmaError("the prompt is empty")
    if not chat_template or not has_chat_template(tokenizer):
        if think:
            raise DGemmaError("thinking needs the chat template, and "
                              + ("it is turned off" if not chat_template else "this model has none"))
        if system:
            prompt = f"{system}\n\n{prompt}"
        return list(tokenizer.encode(prompt))
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return render_chat(tokenizer, messages, think=think)


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` (mlx-lm's wrapper or a transformers tokenizer) has a chat template."""
    return bool(getattr(tokenizer, "has_chat_template", False) or getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: list[dict], *, think: bool, add_generation_prompt: bool = True) -> list[int]:
    """The conversation rendered by the tokenizer's own chat template, as token ids."""
    if not has_chat_template(tokenizer):
        raise DGemmaError("this model has no chat template, so it takes no conversation or instruction "
                          "(a base model: it continues text)")
    try:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, enable_thinking=think, tokenize=True
        )
    except Exception as e:
        raise DGemmaError(f"the chat template failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    return list(ids)


def stream_generate(
    model,
    tokenizer,
    prompt: Union[str, Sequence[int]],
    *,
    cache: Optional[PrefixCache] = None,
    settings: Optional[GenerationSettings] = None,
    images: Optional[Sequence[Any]] = None,
    warm_start: Optional[Sequence[Optional[int]]] = None,
    pinned: Optional[Sequence[Optional[int]]] = None,
    stop_at_eos: bool = True,
    score: bool = False,
    **overrides: Any,
) -> Iterator[Event]:
    """Generate from ``prompt`` and yield a :class:`PassEvent` per denoising pass, a
    :class:`CommitEvent` per block and a final :class:`EndEvent`.

    Args:
        prompt: token ids, or text (tokenized as is, with the tokenizer's BOS; use
            :func:`build_prompt` for the chat template).
        cache: a prefix cache to continue (multi-turn chat). ``prompt`` then holds only the tokens
            not yet in it. Committed blocks except the last are encoded into it.
        settings / overrides: :class:`GenerationSettings` (defaults: the checkpoint's), and
            keyword overrides such as ``steps=16`` or ``seed=0``.
        images: :class:`~dgemma_mlx.multimodal.PromptImage` s for the image tokens of ``prompt``,
            in order (see :func:`~dgemma_mlx.multimodal.build_image_prompt`).
        warm_start: tokens for the generated positions (index ``i`` = block ``i // C``, slot
            ``i % C``), None or -1 where free: a block's first canvas holds them instead of noise
            (the reference's ``decoder_input_ids``), and passes may change them.
        pinned: like ``warm_start``, but the tokens are fixed: in the canvas at every pass, always
            accepted, outside the entropy bound and the stop rule's mean entropy.
        stop_at_eos: False commits whole blocks whatever EOS tokens they hold and generates every
            block (infilling, where EOS fill is pinned).
        score: give every :class:`PassEvent` the ``logprob`` of its argmax tokens.

    With neither ``warm_start`` nor ``pinned`` the output is that of earlier versions, bit for bit
    under the same seed.
    """
    settings = (settings or default_settings(model)).update(**overrides)
    ids = list(tokenizer.encode(prompt)) if isinstance(prompt, str) else [int(t) for t in prompt]
    if not ids:
        raise DGemmaError("the prompt is empty")
    args = model.args
    C, V = args.canvas_length, args.vocab_size
    cache = cache if cache is not None else model.make_cache()
    context = args.max_position_embeddings
    features = None
    if images:
        from .multimodal import check_image_context

        check_image_context(args, cache.offset, len(ids), sum(im.num_tokens for im in images))
        features = mx.concatenate([im.features for im in images])
    if cache.offset + len(ids) + C > context:
        raise DGemmaError(
            f"the prompt ({cache.offset + len(ids)} tokens) leaves no room for a {C}-token block in "
            f"the model's context of {context} tokens"
        )
    room = (context - cache.offset - len(ids)) // C * C
    max_new = min(settings.max_new_tokens, room)
    n_blocks = math.ceil(max_new / C)
    # The generated positions; with short_canvas the last block's canvas ends at max_new.
    positions = max_new if settings.short_canvas else n_blocks * C
    warm = position_tokens(warm_start, positions, V, "warm start")
    pins = position_tokens(pinned, positions, V, "pinned")
    eos = set(args.eos_token_ids) if stop_at_eos else set()
    splitter = ChannelSplitter(tokenizer)

    cache.reserve(cache.offset + len(ids) + n_blocks * C)
    seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(4), "little")
    key = mx.random.key(seed)
    mx.reset_peak_memory()

    start = time.perf_counter()
    model.encode(mx.array(ids, dtype=mx.int32)[None], cache, image_features=features)
    prompt_seconds = time.perf_counter() - start
    gen_start = time.perf_counter()
    out: list[int] = []
    steps_total = 0
    finish = "length"
    for block in range(n_blocks):
        key, init_key = mx.random.split(key)
        width = min(C, positions - block * C)
        block_warm, block_pins = (_block_slice(x, block, C) for x in (warm, pins))
        canvas = initial_canvas((1, width), V, init_key, warm_start=block_warm, pinned=block_pins)
        pin_mask = None if block_pins is None else (np.array(block_pins[0]) >= 0).tolist()
        for p in refine_block(model, cache, canvas, settings=settings, key=key, pinned=block_pins, score=score,
                              eos_ids=sorted(eos)):
            elapsed = time.perf_counter() - start
            yield PassEvent(
                block=block,
                step=p.step,
                max_steps=settings.steps,
                temperature=p.temperature,
                canvas=p.argmax[0].tolist(),
                accepted=p.accepted[0].tolist(),
                entropy=p.entropy[0].tolist(),
                mean_entropy=float(p.mean_entropy[0].item()),
                stopped=bool(p.stopped[0]),
                elapsed=elapsed,
                tokens_per_second=len(out) / max(time.perf_counter() - gen_start, 1e-9),
                pinned=pin_mask,
                logprob=None if p.logprob is None else p.logprob[0].tolist(),
            )
        key, argmax, steps = p.key, p.argmax, p.step
        steps_total += steps

        block_tokens = argmax[0].tolist()
        cut = next((i for i, t in enumerate(block_tokens) if t in eos), None)
        kept = block_tokens if cut is None else block_tokens[:cut]
        kept = kept[: max_new - len(out)]
        out += kept
        hit_eos = cut is not None and len(kept) == cut
        finished = hit_eos or len(out) >= max_new or block == n_blocks - 1
        if hit_eos:
            finish = "eos"
        if not finished:
            model.encode(argmax, cache)
        segments = splitter.commit(kept, final=finished)
        yield CommitEvent(
            block=block, tokens=kept, text=text_of(segments, "answer"), steps=steps, eos=hit_eos,
            finished=finished, encoded=not finished, thought=text_of(segments, "thought"), segments=segments,
        )
        if finished:
            break

    gen_seconds = time.perf_counter() - gen_start
    counted = len(out) + (1 if finish == "eos" else 0)
    stats = GenerationStats(
        prompt_tokens=len(ids),
        prompt_seconds=prompt_seconds,
        prefill_tps=len(ids) / max(prompt_seconds, 1e-9),
        generated_tokens=len(out),
        blocks=block + 1,
        steps=steps_total,
        tokens_per_forward=counted / max(steps_total, 1),
        generation_seconds=gen_seconds,
        generation_tps=len(out) / max(gen_seconds, 1e-9),
        peak_memory_gb=mx.get_peak_memory() / 1e9,
    )
    yield EndEvent(text=splitter.answer, tokens=out, finish_reason=finish, stats=stats, thought=splitter.thought)


def generate(model, tokenizer, prompt: Union[str, Sequence[int]], **kwargs: Any) -> EndEvent:
    """Run :func:`stream_generate` to the end; return the final event (``.text`` is the answer,
    ``.thought`` the thought when thinking was on, ``.stats`` the measurements)."""
    end = None
    for event in stream_generate(model, tokenizer, prompt, **kwargs):
        end = event
    return end


def position_tokens(
    values: Optional[Sequence[Optional[int]]], limit: int, vocab_size: int, what: str
) -> Optional[np.ndarray]:
    """Per-position tokens over generated positions as int32 [limit] (-1 = free), or None when
    ``values`` fixes nothing. Raises a one-line error for bad positions or token ids."""
    if values is None:
        return None
    if len(values) > limit:
        raise DGemmaError(f"{what} tokens cover {len(values)} positions, more than the {limit} being generated")
    out = np.full(limit, -1, dtype=np.int32)
    for i, v in enumerate(values):
        if v is None or v == -1:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < vocab_size:
            raise DGemmaError(f"{what} token at position {i} is not a token id of this model: {v!r}")
        out[i] = v
    return out if (out >= 0).any() else None


def _block_slice(tokens: Optional[np.ndarray], block: int, C: int) -> Optional[mx.array]:
    # Block ``block``'s slice of per-position tokens as int32 [1, C], or None when all free.
    if tokens is None:
        return None
    part = tokens[block * C : (block + 1) * C]  # shorter for a short last canvas
    return mx.array(part)[None] if (part >= 0).any() else None
