"""The denoising passes of one block, for one canvas or a batch of canvases.

:func:`refine_block` refines B >= 1 canvases that sit after the same prefix cache (for instance B
Sudoku puzzles after one shared instruction, or one block of :func:`~dgemma_mlx.generate.stream_generate`)
until each row's stop rule fires or ``settings.steps`` passes are done. A row that stops keeps its
final argmax, acceptance and entropy and drops out of the batch (later passes run the model on the
remaining rows only). It waits for the device once per pass: the stop flags it needs to decide
whether to go on are read together with everything the pass reports. (With the CPU kernels, the
pass's vocabulary-sized soft cap and exponentials also run on the host: :func:`~dgemma_mlx.ops.host_math`.)

With one key per row (``key`` [B, 2]; a single key is split into B for B > 1) every row draws exactly
the random numbers a one-row run with its key would, so the batch reproduces B independent runs
whenever the model's logits for a row do not depend on the other rows (see tests/test_refine.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import mlx.core as mx
import numpy as np

from .cache import PrefixCache
from .compiled_pass import CompiledPass
from .ops import compiled_passes, host_math
from .sampler import sampler_step, split_key, temperature, top_k_logits, uniform_tokens


@dataclass
class RefinePass:
    """The state of all B rows after one pass (arrays already evaluated).

    Rows that stopped at an earlier pass keep the values of their last pass.
    """

    step: int  # 1-based pass number within the block
    max_steps: int
    temperature: float  # of this pass
    argmax: mx.array  # int32 [B, C]: the argmax canvas (pinned tokens where pinned)
    accepted: mx.array  # bool [B, C]: accepted by the row's last pass (pinned positions always)
    entropy: mx.array  # float32 [B, C]: entropy of the temperature-scaled distribution
    mean_entropy: mx.array  # float32 [B]: mean over the row's free positions
    stopped: np.ndarray  # bool [B]: the stop rule has fired for the row (at this pass or before)
    refined: np.ndarray  # bool [B]: rows this pass refined (those not stopped before it)
    passes: np.ndarray  # int [B]: passes each row has taken so far
    key: mx.array  # random key(s) after this pass, to continue the caller's random stream
    logprob: Optional[mx.array] = None  # float32 [B, C]: log softmax(logits) at argmax (score=True)

    @property
    def done(self) -> bool:
        """True when no further pass will follow (every row stopped, or the last pass)."""
        return bool(self.stopped.all()) or self.step == self.max_steps


def initial_canvas(
    shape: tuple[int, int],
    vocab_size: int,
    key: mx.array,
    *,
    warm_start: Optional[mx.array] = None,
    pinned: Optional[mx.array] = None,
) -> mx.array:
    """A block's first canvas int32 ``shape`` = [B, C]: uniform noise drawn with ``key``, then the
    warm start's tokens where it is >= 0, then the pinned tokens where they are >= 0."""
    canvas = uniform_tokens(shape, vocab_size, key)
    for fixed in (warm_start, pinned):
        if fixed is not None:
            canvas = mx.where(fixed >= 0, fixed.astype(mx.int32), canvas)
    return canvas


def refine_block(
    model,
    cache,
    canvas: mx.array,
    *,
    settings,
    key: mx.array,
    pinned: Optional[mx.array] = None,
    score: bool = False,
    eos_ids: Sequence[int] = (),
) -> Iterator[RefinePass]:
    """Refine ``canvas`` (int32 [B, C], the first canvas: see :func:`initial_canvas`) pass by pass;
    yield a :class:`RefinePass` after each pass. The last one yielded has ``done`` set.

    Args:
        cache: the prefix cache all rows share (batch 1); it is not modified.
        settings: a :class:`~dgemma_mlx.generate.GenerationSettings` (steps, temperatures, entropy
            bound, stop rule).
        key: one random key [2] (split into one per row when B > 1) or per-row keys [B, 2]. For
            B = 1 with one key the draws are those :func:`~dgemma_mlx.generate.stream_generate`
            has always made.
        pinned: int32 [B, C], -1 for free positions, else the token the position is fixed to.
        score: also report ``logprob``, the log-probability (temperature 1) of each argmax token.
        eos_ids: end-of-sequence ids, used only by ``settings.freeze_accepted`` (the EOS-filled
            tail). With ``freeze_accepted`` a position keeps its values (entropy, ``logprob``) from
            the last pass that computed it.
    """
    B = canvas.shape[0]
    if key.ndim == 1 and B > 1:
        key = mx.random.split(key, B)
    steps = settings.steps
    freeze, top_k = settings.freeze_accepted, settings.top_k
    use_probs = model.dtype == mx.float32
    rows = np.arange(B)  # the rows still refined, in batch order
    stopped = np.zeros(B, dtype=bool)
    passes = np.zeros(B, dtype=np.int64)
    full: dict[str, mx.array] = {}
    history: list[mx.array] = []
    sc_logits = sc_probs = sc_ids = None  # sc_ids: the token ids of top-k probabilities
    sc_soft = None  # freeze: the self-conditioning soft embedding [B', C, H], kept per position
    frozen = None
    # The fused kernels run the passes after the first as one compiled graph (not with
    # freeze_accepted, which picks each pass's positions on the host, nor when the experts do).
    compiled = None
    compile_passes = compiled_passes() and not freeze and isinstance(cache, PrefixCache) and not model.host_syncs
    if freeze:  # the fixed tokens of the rows still refined: pinned, then accepted ones too
        frozen = np.full(canvas.shape, -1, np.int32) if pinned is None else np.array(pinned, np.int32)
        kept: dict[str, mx.array] = {}  # [B', C] values of frozen positions, from their last pass
    for step, n in enumerate(range(steps, 0, -1), start=1):
        key, step_key = split_key(key)
        sampling = dict(
            step=n, max_steps=steps, t_min=settings.t_min, t_max=settings.t_max,
            entropy_bound=settings.entropy_bound, confidence_threshold=settings.confidence_threshold,
            stability_threshold=settings.stability_threshold, key=step_key,
        )
        if freeze:
            # The first pass reads every position (each gets a self-conditioning embedding);
            # later ones only the free positions (see `_slots`).
            idx, slot_pins = _slots(frozen, every=step == 1)
            logits, r, ids = _pass(model, cache, canvas, dict(self_conditioning_embedding=sc_soft), top_k, sampling,
                                   history=[mx.take_along_axis(h, idx, axis=1) for h in history],
                                   pinned=slot_pins, positions=idx)
            fixed = mx.array(frozen)
            tokens = mx.where(fixed >= 0, fixed, 0)
            put = lambda whole, part: mx.put_along_axis(whole, idx.reshape(*idx.shape, *[1] * (part.ndim - 2)), part, axis=1)
            argmax, accepted = put(tokens, r.argmax), put(fixed >= 0, r.accepted)
            next_canvas = put(tokens, r.canvas)
            kept["entropy"] = put(kept.get("entropy", mx.zeros(canvas.shape, mx.float32)), r.entropy)
            fixed = _freeze(fixed, accepted, next_canvas, eos_ids)
            # A frozen position's token is its accepted draw, in the canvas and in the argmax.
            next_canvas, argmax = mx.where(fixed >= 0, fixed, next_canvas), mx.where(fixed >= 0, fixed, argmax)
            stop_flags = r.stop | (fixed >= 0).all(axis=1)  # nothing left to refine
            # The next pass's self-conditioning: only the computed positions' soft embeddings are
            # new (a frozen position keeps the one of the last pass that computed it).
            soft = model.self_conditioning_embedding(None if use_probs else r.scaled,
                                                     probs=r.probs if use_probs else None, ids=ids)
            soft = soft if sc_soft is None else put(sc_soft, soft)
            probs = scaled = ids = None
            now = {"argmax": argmax, "accepted": accepted, "entropy": kept["entropy"], "mean_entropy": r.mean_entropy}
        else:
            if compile_passes and step > 1:
                if compiled is None:
                    compiled = CompiledPass(model, cache, top_k=top_k, sampling=sampling)
                logits, r, ids = compiled(canvas, sc_probs if use_probs else sc_logits, sc_ids, step=n, max_steps=steps,
                                          key=step_key, history=history, pinned=pinned)
            else:
                sc = dict(self_conditioning_logits=sc_logits, self_conditioning_probs=sc_probs, self_conditioning_ids=sc_ids)
                logits, r, ids = _pass(model, cache, canvas, sc, top_k, sampling, history=history, pinned=pinned)
            next_canvas, probs, scaled, stop_flags = r.canvas, r.probs, r.scaled, r.stop
            now = {"argmax": r.argmax, "accepted": r.accepted, "entropy": r.entropy, "mean_entropy": r.mean_entropy}
        if score:
            picked = mx.take_along_axis(logits, r.argmax[..., None], axis=-1)[..., 0]
            logprob = picked - mx.logsumexp(logits, axis=-1)
            if freeze:
                logprob = kept["logprob"] = put(kept.get("logprob", mx.zeros(canvas.shape, mx.float32)), logprob)
            now["logprob"] = logprob
        full = now if len(rows) == B else _scatter(full, now, rows)
        mx.eval(stop_flags, next_canvas, *full.values(), *([fixed, soft] if freeze else []))
        stop = np.array(stop_flags)
        passes[rows] += 1
        refined = np.zeros(B, dtype=bool)
        refined[rows] = True
        stopped[rows[stop]] = True
        yield RefinePass(
            step=step,
            max_steps=steps,
            temperature=temperature(n, steps, settings.t_min, settings.t_max),
            argmax=full["argmax"],
            accepted=full["accepted"],
            entropy=full["entropy"],
            mean_entropy=full["mean_entropy"],
            stopped=stopped.copy(),
            refined=refined,
            passes=passes.copy(),
            key=key,
            logprob=full.get("logprob"),
        )
        if stopped.all():
            break
        canvas = next_canvas
        if use_probs:
            sc_probs = probs
        else:
            sc_logits = scaled
        sc_ids = ids
        if freeze:
            frozen, sc_soft = np.array(fixed), soft
        if settings.stability_threshold:
            history = (history + [now["argmax"]])[-settings.stability_threshold :]
        if stop.any():
            # Drop the rows that stopped: gather what the next pass reads.
            keep = mx.array(np.flatnonzero(~stop))
            rows = rows[~stop]
            canvas, key = canvas[keep], key[keep]
            sc_probs = None if sc_probs is None else sc_probs[keep]
            sc_logits = None if sc_logits is None else sc_logits[keep]
            sc_ids = None if sc_ids is None else sc_ids[keep]
            sc_soft = None if sc_soft is None else sc_soft[keep]
            pinned = None if pinned is None else pinned[keep]
            history = [h[keep] for h in history]
            if freeze:
                frozen = frozen[~stop]
                kept = {name: value[keep] for name, value in kept.items()}


def _pass(model, cache, canvas, sc: dict, top_k, sampling, *, history, pinned, positions=None):
    """One model pass and the sampler on it: ``(logits, StepResult, ids)``. With ``top_k`` the
    sampler sees each position's top-k logits and ``ids`` [B, C', k] are their token ids (None
    otherwise); ``sc`` holds the self-conditioning arguments of :meth:`Model.denoise`."""
    sc = dict(sc)
    with host_math():  # nothing here is differentiated
        # The logits stay the third positional argument, as for any wrapper of `denoise`.
        logits = model.denoise(canvas, cache, sc.pop("self_conditioning_logits", None), **sc, positions=positions)
        if not top_k:
            return logits, sampler_step(logits, history=history, pinned=pinned, **sampling), None
        values, ids = top_k_logits(logits, top_k)
        r = sampler_step(values, history=history, pinned=pinned, token_ids=ids, vocab_size=logits.shape[-1], **sampling)
    return logits, r, ids


def _slots(frozen: np.ndarray, every: bool) -> tuple[mx.array, mx.array]:
    """The canvas positions a frozen-accepted pass computes, per row: ``idx`` int32 [B, K], and
    ``pins`` int32 [B, K], the fixed token of a slot (-1 for a free one).

    ``every``: all C positions (frozen ones as pinned slots). Else each row's free positions, padded
    to the largest count with a frozen position of the row (a pinned slot: its values are that
    position's own, so writing them back changes nothing the sampler relies on).
    """
    B, C = frozen.shape
    if every:
        idx = np.broadcast_to(np.arange(C, dtype=np.int32), (B, C))
        return mx.array(idx), mx.array(frozen)
    free = frozen < 0
    K = max(int(free.sum(1).max()), 1)
    idx = np.zeros((B, K), np.int32)
    for b in range(B):
        f = np.flatnonzero(free[b])
        idx[b, : len(f)] = f
        if len(f) < K:
            idx[b, len(f) :] = np.flatnonzero(~free[b])[0]
    pins = np.take_along_axis(frozen, idx, axis=1)
    return mx.array(idx), mx.array(pins)


def _freeze(fixed: mx.array, accepted: mx.array, canvas: mx.array, eos_ids: Sequence[int]) -> mx.array:
    """The fixed tokens after a pass: the accepted draws join them; with ``eos_ids``, the free
    positions after a fixed EOS are fixed to that EOS id's first entry (an EOS-filled tail)."""
    fixed = mx.where(accepted & (fixed < 0), canvas, fixed)
    if eos_ids:
        is_eos = mx.zeros(fixed.shape, mx.bool_)
        for e in eos_ids:
            is_eos = is_eos | (fixed == e)
        after = (mx.cumsum(is_eos.astype(mx.int32), axis=1) - is_eos.astype(mx.int32)) > 0
        fixed = mx.where(after & (fixed < 0), eos_ids[0], fixed)
    return fixed


def refine(model, cache, canvas: mx.array, **kwargs) -> RefinePass:
    """Run :func:`refine_block` to the end and return its last pass (``argmax`` is the result,
    ``passes`` the passes each row took)."""
    last = None
    for last in refine_block(model, cache, canvas, **kwargs):
        pass
    return last


def _scatter(full: dict[str, mx.array], now: dict[str, mx.array], rows: np.ndarray) -> dict[str, mx.array]:
    # Write the refined rows' values into the whole batch's arrays.
    idx = mx.array(rows)
    out = {}
    for name, value in now.items():
        whole = mx.array(full[name])
        whole[idx] = value
        out[name] = whole
    return out
