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
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .cache import PrefixCache
from .channels import ChannelSplitter, channel_ids
from .errors import DGemmaError
from .events import CommitEvent, EndEvent, Event, GenerationStats, PassEvent
from .refine import initial_canvas, refine_block


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings. Defaults are the reference's; a checkpoint's ``generation_config.json``
    overrides them (:meth:`from_generation_config`) and the caller overrides both."""

    max_new_tokens: int = 256
    steps: int = 48
    entropy_bound: float = 0.1
    t_min: float = 0.4
    t_max: float = 0.8
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    seed: Optional[int] = None

    @classmethod
    def from_generation_config(cls, config: Optional[dict[str, Any]]) -> "GenerationSettings":
        config = config or {}
        found: dict[str, Any] = {}
        names = {
            "max_new_tokens": "max_new_tokens",
            "max_denoising_steps": "steps",
            "t_min": "t_min",
            "t_max": "t_max",
            "stability_threshold": "stability_threshold",
            "confidence_threshold": "confidence_threshold",
        }
        for src, dst in names.items():
            if config.get(src) is not None:
                found[dst] = config[src]
        sampler = config.get("sampler_config")
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            found["entropy_bound"] = sampler["entropy_bound"]
        return cls().update(**found)

    def update(self, **overrides: Any) -> "GenerationSettings":
        """A copy with the non-None ``overrides`` applied and checked."""
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise DGemmaError(f"unknown generation setting '{sorted(unknown)[0]}'")
        values = {k: v for k, v in overrides.items() if v is not None}
        try:
            for k in ("max_new_tokens", "steps", "stability_threshold"):
                if k in values:
                    values[k] = _as_int(values[k], k)
            for k in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
                if k in values:
                    values[k] = float(values[k])
            if values.get("seed") is not None:
                values["seed"] = _as_int(values["seed"], "seed")
        except (TypeError, ValueError):
            raise DGemmaError(f"generation setting has a value of the wrong type: {values}")
        settings = replace(self, **values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.steps <= 0:
            raise DGemmaError(f"steps must be at least 1 (got {self.steps})")
        if self.max_new_tokens <= 0:
            raise DGemmaError(f"max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.entropy_bound <= 0:
            raise DGemmaError(f"entropy-bound must be positive (got {self.entropy_bound})")
        if self.t_min < 0 or self.t_max <= self.t_min:
            raise DGemmaError(f"temperatures need 0 <= t-min < t-max (got t-min {self.t_min}, t-max {self.t_max})")
        if self.stability_threshold < 0:
            raise DGemmaError(f"stability threshold must be >= 0 (got {self.stability_threshold})")
        if self.confidence_threshold <= 0:
            raise DGemmaError(f"confidence threshold must be positive (got {self.confidence_threshold})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _as_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(name)
    return int(value)


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
    if not chat_template or not getattr(tokenizer, "has_chat_template", False):
        if system:
            prompt = f"{system}\n\n{prompt}"
        return list(tokenizer.encode(prompt))
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    return render_chat(tokenizer, messages, think=think)


def render_chat(tokenizer, messages: list[dict], *, think: bool, add_generation_prompt: bool = True) -> list[int]:
    """The conversation rendered by the tokenizer's own chat template, as token ids."""
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
    if cache.offset + len(ids) + C > context:
        raise DGemmaError(
            f"the prompt ({cache.offset + len(ids)} tokens) leaves no room for a {C}-token block in "
            f"the model's context of {context} tokens"
        )
    room = (context - cache.offset - len(ids)) // C * C
    max_new = min(settings.max_new_tokens, room)
    n_blocks = math.ceil(max_new / C)
    warm = position_tokens(warm_start, n_blocks * C, V, "warm start")
    pins = position_tokens(pinned, n_blocks * C, V, "pinned")
    eos = set(args.eos_token_ids) if stop_at_eos else set()
    splitter = ChannelSplitter(tokenizer, *channel_ids(tokenizer))

    cache.reserve(cache.offset + len(ids) + n_blocks * C)
    seed = settings.seed if settings.seed is not None else int.from_bytes(os.urandom(4), "little")
    key = mx.random.key(seed)
    mx.reset_peak_memory()

    start = time.perf_counter()
    model.encode(mx.array(ids, dtype=mx.int32)[None], cache)
    prompt_seconds = time.perf_counter() - start
    gen_start = time.perf_counter()
    out: list[int] = []
    steps_total = 0
    finish = "length"
    for block in range(n_blocks):
        key, init_key = mx.random.split(key)
        block_warm, block_pins = (_block_slice(x, block, C) for x in (warm, pins))
        canvas = initial_canvas((1, C), V, init_key, warm_start=block_warm, pinned=block_pins)
        pin_mask = None if block_pins is None else (np.array(block_pins[0]) >= 0).tolist()
        for p in refine_block(model, cache, canvas, settings=settings, key=key, pinned=block_pins, score=score):
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
        text = "".join(s.text for s in splitter.feed(kept))
        if finished:
            text += "".join(s.text for s in splitter.flush())
        yield CommitEvent(
            block=block, tokens=kept, text=text, steps=steps, eos=hit_eos, finished=finished, encoded=not finished
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
    part = tokens[block * C : (block + 1) * C]
    return mx.array(part)[None] if (part >= 0).any() else None
