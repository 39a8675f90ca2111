"""The denoising passes of one block, for one canvas or a batch of canvases.

:func:`refine_block` refines B >= 1 canvases that sit after the same prefix cache (for instance B
Sudoku puzzles after one shared instruction, or one block of :func:`~dgemma_mlx.generate.stream_generate`)
until each row's stop rule fires or ``settings.steps`` passes are done. A row that stops keeps its
final argmax, acceptance and entropy and drops out of the batch (later passes run the model on the
remaining rows only). It waits for the device once per pass: the stop flags it needs to decide
whether to go on are read together with everything the pass reports.

With one key per row (``key`` [B, 2]; a single key is split into B for B > 1) every row draws exactly
the random numbers a one-row run with its key would, so the batch reproduces B independent runs
whenever the model's logits for a row do not depend on the other rows (see tests/test_refine.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import mlx.core as mx
import numpy as np

from .sampler import sampler_step, split_key, temperature, uniform_tokens


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
    """
    B = canvas.shape[0]
    if key.ndim == 1 and B > 1:
        key = mx.random.split(key, B)
    steps = settings.steps
    use_probs = model.dtype == mx.float32
    rows = np.arange(B)  # the rows still refined, in batch order
    stopped = np.zeros(B, dtype=bool)
    passes = np.zeros(B, dtype=np.int64)
    full: dict[str, mx.array] = {}
    history: list[mx.array] = []
    sc_logits = sc_probs = None
    for step, n in enumerate(range(steps, 0, -1), start=1):
        key, step_key = split_key(key)
        logits = model.denoise(canvas, cache, sc_logits, self_conditioning_probs=sc_probs)
        r = sampler_step(
            logits,
            step=n,
            max_steps=steps,
            t_min=settings.t_min,
            t_max=settings.t_max,
            entropy_bound=settings.entropy_bound,
            confidence_threshold=settings.confidence_threshold,
            history=history,
            stability_threshold=settings.stability_threshold,
            key=step_key,
            pinned=pinned,
        )
        now = {"argmax": r.argmax, "accepted": r.accepted, "entropy": r.entropy, "mean_entropy": r.mean_entropy}
        if score:
            picked = mx.take_along_axis(logits, r.argmax[..., None], axis=-1)[..., 0]
            now["logprob"] = picked - mx.logsumexp(logits, axis=-1)
        full = now if len(rows) == B else _scatter(full, now, rows)
        mx.eval(r.stop, r.canvas, *full.values())
        stop = np.array(r.stop)
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
        canvas = r.canvas
        if use_probs:
            sc_probs = r.probs
        else:
            sc_logits = r.scaled
        if settings.stability_threshold:
            history = (history + [r.argmax])[-settings.stability_threshold :]
        if stop.any():
            # Drop the rows that stopped: gather what the next pass reads.
            keep = mx.array(np.flatnonzero(~stop))
            rows = rows[~stop]
            canvas, key = canvas[keep], key[keep]
            sc_probs = None if sc_probs is None else sc_probs[keep]
            sc_logits = None if sc_logits is None else sc_logits[keep]
            pinned = None if pinned is None else pinned[keep]
            history = [h[keep] for h in history]


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
