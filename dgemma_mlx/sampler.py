"""Entropy-bound sampler for DiffusionGemma block diffusion.

One denoising step at step ``n`` (counting down from ``N = max_steps`` to 1) turns the decoder
logits ``[B, C, V]`` into the next canvas, following transformers'
``DiffusionGemmaGenerationMixin._denoising_step``:

1. ``scaled = logits / T`` with ``T = t_min + (t_max - t_min) * n / N``.
2. One token per position is drawn from ``softmax(scaled)``.
3. Positions are sorted by the entropy of ``softmax(scaled)``; the lowest-entropy ones are
   accepted while ``cumsum(sorted) - sorted <= entropy_bound`` (always at least one).
4. Accepted positions keep their draw, the others get fresh uniform-random ids.
5. A row stops when its argmax canvas has not changed for ``stability_threshold`` steps and its
   mean entropy is below ``confidence_threshold``.

Pinned positions (ours; the reference has none) hold a fixed token: it is the draw, the argmax and
the next canvas there, the position counts as accepted, and it is left out of the entropy-bound
selection (the bound applies to the free positions) and of the stop rule's mean entropy (the mean
over the free positions; a row with no free position stops at once).

``key`` is one key for the whole batch, or one key per row ([B, 2]): then row ``b`` draws exactly
what a one-row call with ``key[b]`` draws, so a batch reproduces independent runs.

Everything here is a pure function of ``mx.array``s that never synchronises with the host, so the
generation loop can ``mx.async_eval`` a whole step; the one exception is opt-in and CPU-only:
inside :func:`~dgemma_mlx.ops.host_math` the vocabulary-sized exponentials evaluate their input
and run as NumPy loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from .ops import (LOG2E, compute_streams, exp2, fused, host_exp2_block, host_map, host_math_applies, host_rows,
                  split_range)

# Inverse-CDF sampling works on blocks of this many vocabulary entries (see `sample_tokens`).
SAMPLE_BLOCK = 512

_F32_MIN = float(np.finfo(np.float32).min)


def temperature(step: int, max_steps: int, t_min: float, t_max: float) -> float:
    """Temperature at denoising step ``step`` (counting down from ``max_steps`` to 1).

    ``t_min + (t_max - t_min) * step / max_steps``, rounded exactly as the reference rounds it in
    ``_denoising_step`` (where ``cur_step`` is an int32 tensor, so the arithmetic is float32).
    """
    f = np.float32
    return float(f(t_min) + f(t_max - t_min) * (f(step) / f(max_steps)))


# exp in base 2 (:func:`ops.exp2`: a compiled polynomial with the CPU kernels, where ``exp`` is
# slow, or NumPy's with host math; the model's softmax computes the same values, so
# self-conditioning from these probabilities equals self-conditioning from the logits). Compiled
# (fused) on the GPU.
def _exp_terms(scaled: mx.array, row_max: mx.array) -> tuple[mx.array, mx.array]:
    # e = exp(z) and e * z with z = scaled - max; z is clamped so that e = 0 gives 0, not nan.
    if host_math_applies(scaled):
        return tuple(host_map(_host_exp_terms, scaled, row_max, outputs=2))
    return _exp_terms_mlx(scaled, row_max)


@fused
def _exp_terms_mlx(scaled: mx.array, row_max: mx.array) -> tuple[mx.array, mx.array]:
    z = scaled - row_max
    e = exp2(z * LOG2E)
    return e, e * mx.maximum(z, _F32_MIN)


def _host_exp_terms(scaled: np.ndarray, row_max: np.ndarray, e: np.ndarray, ez: np.ndarray) -> None:
    # ez may be scaled itself (it is read once, first).
    with np.errstate(all="ignore"):
        np.subtract(scaled, row_max, out=ez)  # z
        np.multiply(ez, np.float32(LOG2E), out=e)
        host_exp2_block(e, e)  # 0 below 2**-126, as the polynomial
        np.maximum(ez, np.float32(_F32_MIN), out=ez)
        ez *= e


def _block_view(x: mx.array) -> mx.array:
    # [..., V] -> [..., nb, blk] (zero-padded at the end when blk does not divide V).
    vocab = x.shape[-1]
    blk = min(SAMPLE_BLOCK, vocab)
    pad = -vocab % blk
    if pad:
        x = mx.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], -1, blk)


def _softmax_parts(scaled: mx.array, argmax: mx.array) -> tuple[mx.array, ...]:
    """Softmax pieces of scaled logits [..., V] whose argmax [...] is given.

    Returns ``e = exp(scaled - max)`` [..., V], the same in blocks [..., nb, blk] with their sums
    [..., nb] (these drive the sampler), the normaliser ``sum(e)`` [...] and the entropy [...].
    One max pass, one fused exp pass and two block-sum passes over ``[..., V]``. The max token's
    ``e`` is exactly 1 and float32 would drop the small tail mass added next to it, so the rest
    is summed on its own and the entropy is ``log1p(rest) - sum(e * z) / sum(e)``: accurate for
    confident positions too.
    """
    e, ez = _exp_terms(scaled, mx.max(scaled, axis=-1, keepdims=True))
    return (e, *_softmax_sums(e, argmax, _block_view(ez).sum(-1).sum(-1)))


def _softmax_sums(e: mx.array, argmax: mx.array, ez_sum: mx.array) -> tuple[mx.array, ...]:
    # The sums of :func:`_softmax_parts`: blocks, block sums, normaliser and entropy from e and
    # the sum of e * z.
    blocks = _block_view(e)
    nb, blk = blocks.shape[-2:]
    block_sums = blocks.sum(-1)
    top = (argmax // blk)[..., None]
    top_block = mx.take_along_axis(blocks, top[..., None], axis=-2)[..., 0, :]
    top_rest = mx.where(mx.arange(blk) == (argmax % blk)[..., None], 0.0, top_block).sum(-1, keepdims=True)
    rest = mx.where(mx.arange(nb) == top, top_rest, block_sums).sum(-1)
    total = 1.0 + rest
    entropy = mx.log1p(rest) - ez_sum / total
    return blocks, block_sums, total, entropy


def token_entropy(scaled_logits: mx.array) -> mx.array:
    """Entropy in nats of ``softmax(scaled_logits)``: [..., V] -> [...] float32.

    Matches ``torch.distributions.Categorical(logits=scaled_logits).entropy()`` to float32 rounding
    (closer to the exact value for confident positions); ``-inf`` logits contribute 0.
    """
    scaled = scaled_logits.astype(mx.float32)
    return _softmax_parts(scaled, mx.argmax(scaled, axis=-1).astype(mx.int32))[-1]


def _stable_rank(x: mx.array) -> mx.array:
    # Position of each entry in an ascending sort of the last axis, ties by lower index first.
    # Pairwise [..., C, C] comparison: cheap for canvas-sized C, and stable on every backend.
    idx = mx.arange(x.shape[-1])
    xi, xj = x[..., :, None], x[..., None, :]
    before = (xj < xi) | ((xj == xi) & (idx[None, :] < idx[:, None]))
    return before.sum(-1).astype(mx.int32)


def accept_from_entropy(entropy: mx.array, entropy_bound: float) -> mx.array:
    """Entropy-bound acceptance mask: entropy [B, C] -> bool [B, C].

    Sort each row's entropies ascending and accept the k lowest while
    ``cumsum(sorted) - sorted <= entropy_bound`` (so at least the lowest one). Ties go to the
    lower position (a stable sort). The reference uses torch's default sort, which is not stable
    for rows longer than 16, so within an exactly tied group cut by the bound it may pick other
    (equally many) positions. Torch's CPU cumsum also accumulates in float64, ours in float32:
    the two can disagree only where ``cumsum - sorted`` is within float32 rounding of the bound.
    """
    rank = _stable_rank(entropy)
    sorted_entropy = mx.take_along_axis(entropy, mx.argsort(rank, axis=-1), axis=-1)
    keep = mx.cumsum(sorted_entropy, axis=-1) - sorted_entropy <= entropy_bound
    return mx.take_along_axis(keep, rank, axis=-1)


def entropy_bound_accept(scaled_logits: mx.array, entropy_bound: float) -> mx.array:
    """Acceptance mask of `accept_from_entropy` for scaled logits [B, C, V] -> bool [B, C]."""
    return accept_from_entropy(token_entropy(scaled_logits), entropy_bound)


def _inverse_cdf(blocks: mx.array, block_sums: mx.array, fallback: mx.array, u: mx.array) -> mx.array:
    # Draw one flat index per row of weights given in blocks [..., nb, blk] (with their sums), with
    # probability proportional to its weight. Two levels: pick a block from the cumsum of block
    # sums, then an entry from the cumsum inside that block. An entry is chosen only where its cdf
    # steps up past the target, so weight-0 entries never are; `fallback` [...] (an entry of
    # positive weight) guards against rounding in scans that are not monotone. `u` [..., 1] holds
    # one uniform draw in [0, 1) per row.
    nb, blk = blocks.shape[-2:]
    cdf = mx.cumsum(block_sums, axis=-1)
    target = (1.0 - u) * cdf[..., -1:]
    b = mx.minimum((cdf < target).sum(-1, keepdims=True), nb - 1)
    cdf_before = mx.concatenate([mx.zeros_like(cdf[..., :1]), cdf[..., :-1]], axis=-1)
    before = mx.take_along_axis(cdf_before, b, axis=-1)
    inner = mx.cumsum(mx.take_along_axis(blocks, b[..., None], axis=-2)[..., 0, :], axis=-1)
    local = mx.minimum(target - before, inner[..., -1:])
    j = mx.minimum((inner < local).sum(-1, keepdims=True), blk - 1)
    token = (b * blk + j).astype(mx.int32)
    positive = mx.take_along_axis(blocks.reshape(*blocks.shape[:-2], -1), token, axis=-1) > 0
    return mx.where(positive, token, fallback[..., None])[..., 0]


def sample_tokens(scaled_logits: mx.array, key: mx.array) -> mx.array:
    """One draw per position from ``softmax(scaled_logits)``: [B, C, V] -> int32 [B, C].

    Inverse-CDF sampling with one uniform per position, so the same ``key`` gives the same draw
    and zero-probability tokens (``-inf`` or underflowing logits) are never drawn.

    Measured on the MLX CPU backend (2 cores), V=262144, B*C=256, float32, probabilities given:
    ``mx.random.categorical`` (Gumbel-max, V randoms per row) 910-990 ms; flat inverse CDF
    (cumsum over V, then count) 245-260 ms; this two-level inverse CDF (sums of 512-wide blocks,
    cumsum over the 512 sums, then a cumsum inside the chosen block) 51-53 ms, and ~2 ms inside
    `sampler_step`, which shares the block sums with the softmax. A flat float32 cumsum over
    262144 entries also drifts by up to 5e-4 in probability (1/3 of draws differ from a float64
    cdf given the same uniform); the two-level one matches float64 for 98% of draws, the rest
    differing only at float-rounding boundaries.
    """
    scaled = scaled_logits.astype(mx.float32)
    argmax = mx.argmax(scaled, axis=-1).astype(mx.int32)
    _, blocks, block_sums, _, _ = _softmax_parts(scaled, argmax)
    return _inverse_cdf(blocks, block_sums, argmax, _uniforms(scaled.shape[:-1], key))


TOPK_BLOCK = 512
"""Block width of :func:`top_k_logits`' first level."""


def top_k_logits(logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
    """The ``k`` largest logits of each position and their token ids: [..., V] -> ([..., k],
    int32 [..., k]), in no particular order; exact (ties may pick either token).

    Hierarchical for a large vocabulary: the maximum of each block of :data:`TOPK_BLOCK` logits,
    the ``k`` blocks with the largest maxima (every one of the top k lies in such a block: a block
    holding one has a maximum at least as large, and at most k blocks do), then the top ``k`` of
    those ``k * TOPK_BLOCK`` candidates. One pass over V plus a partition of 1/(V / k / 512) of it,
    instead of a partition of all of V.
    """
    V = logits.shape[-1]
    if k >= V:
        ids = mx.broadcast_to(mx.arange(V, dtype=mx.int32), logits.shape)
        return logits, ids
    if V % TOPK_BLOCK or V // TOPK_BLOCK <= 4 * k:
        ids = mx.argpartition(-logits, k - 1, axis=-1)[..., :k].astype(mx.int32)
        return mx.take_along_axis(logits, ids, axis=-1), ids
    lead = logits.shape[:-1]
    blocks = logits.reshape(*lead, V // TOPK_BLOCK, TOPK_BLOCK)
    top_blocks = mx.argpartition(-blocks.max(-1), k - 1, axis=-1)[..., :k].astype(mx.int32)  # [..., k]
    candidates = mx.take_along_axis(blocks, top_blocks[..., None], axis=-2).reshape(*lead, k * TOPK_BLOCK)
    j = mx.argpartition(-candidates, k - 1, axis=-1)[..., :k].astype(mx.int32)
    ids = mx.take_along_axis(top_blocks, j // TOPK_BLOCK, axis=-1) * TOPK_BLOCK + j % TOPK_BLOCK
    return mx.take_along_axis(candidates, j, axis=-1), ids


def _per_row(draw, shape: tuple[int, ...], key: mx.array) -> mx.array:
    # draw(shape, key) with one key, or row by row with one key per row ([B, 2]), so that row b
    # gets exactly what draw((1, *shape[1:]), key[b]) gives.
    if key.ndim == 1:
        return draw(shape, key)
    return mx.vmap(lambda k: draw(shape[1:], k))(key)


def split_key(key: mx.array) -> tuple[mx.array, mx.array]:
    """``mx.random.split(key)`` for one key [2] or for each of per-row keys [B, 2]."""
    parts = mx.random.split(key) if key.ndim == 1 else mx.vmap(mx.random.split)(key).swapaxes(0, 1)
    return parts[0], parts[1]


def _uniforms(shape: tuple[int, ...], key: mx.array) -> mx.array:
    # One uniform per position, [..., 1]: drawn for the whole canvas at once, so that splitting
    # the work over streams does not change the draws.
    return _per_row(lambda shp, k: mx.random.uniform(shape=(*shp, 1), key=k), shape, key)


def uniform_tokens(shape: tuple[int, ...], vocab_size: int, key: mx.array) -> mx.array:
    """Uniform random token ids in ``[0, vocab_size)``, int32 of ``shape`` (one key, or one per row)."""
    return _per_row(lambda shp, k: mx.random.randint(0, vocab_size, shp, dtype=mx.int32, key=k), shape, key)


def renoise(accepted: mx.array, sampled: mx.array, vocab_size: int, key: mx.array) -> mx.array:
    """Next canvas: ``sampled`` where ``accepted`` (bool [B, C]), fresh uniform ids elsewhere."""
    return mx.where(accepted, sampled, uniform_tokens(sampled.shape, vocab_size, key))


def is_stable(history: list[mx.array], argmax: mx.array, stability_threshold: int) -> mx.array:
    """Whether ``argmax`` [B, C] equals each of the last ``stability_threshold`` canvases in
    ``history`` (this block's previous argmax canvases, oldest first): bool [B].

    Threshold 0 is always stable; with fewer previous steps than the threshold (e.g. the first step
    of a block) nothing is.
    """
    rows = argmax.shape[:1]
    if stability_threshold == 0:
        return mx.ones(rows, dtype=mx.bool_)
    if len(history) < stability_threshold:
        return mx.zeros(rows, dtype=mx.bool_)
    previous = mx.stack(history[-stability_threshold:])
    return mx.all(previous == argmax, axis=(0, 2))


def is_confident(entropy: mx.array, confidence_threshold: float) -> mx.array:
    """Whether the mean entropy over the canvas is below the threshold: [B, C] -> bool [B]."""
    return entropy.mean(-1) < confidence_threshold


@dataclass
class StepResult:
    """Outputs of `sampler_step` (all lazy ``mx.array``s)."""

    canvas: mx.array  # int32 [B, C]: the next canvas (accepted draws, noise elsewhere)
    argmax: mx.array  # int32 [B, C]: argmax of the scaled logits
    accepted: mx.array  # bool [B, C]: positions whose draw was accepted
    entropy: mx.array  # float32 [B, C]: entropy of softmax(scaled)
    mean_entropy: mx.array  # float32 [B]: over the free (unpinned) positions
    stop: mx.array  # bool [B]: stable and confident (or nothing free)
    scaled: mx.array  # float32 [B, C, V]: logits / T, the next self-conditioning input
    probs: mx.array  # float32 [B, C, V]: softmax(scaled)


def sampler_step(
    logits: mx.array,
    *,
    step: int,
    max_steps: int,
    t_min: float,
    t_max: float,
    entropy_bound: float,
    confidence_threshold: float,
    history: list[mx.array],
    stability_threshold: int,
    key: mx.array,
    pinned: Optional[mx.array] = None,
    token_ids: Optional[mx.array] = None,
    vocab_size: Optional[int] = None,
    t: Optional[mx.array] = None,
) -> StepResult:
    """One denoising step of the sampler for decoder logits [B, C, V] at step ``step``.

    Same results as the individual functions (temperature, sample_tokens, accept_from_entropy,
    renoise, is_stable, is_confident) but with one softmax shared by sampling, entropy and
    ``probs``. ``key`` is split into a sampling key and a renoising key; renoised ids are drawn
    from ``[0, V)``. ``history`` holds this block's previous argmax canvases; the caller appends
    ``argmax`` afterwards (and may keep only the last ``stability_threshold``). Freezing rows that
    already stopped is also the caller's job. Nothing here waits for the device.

    ``pinned`` (int32 [B, C], -1 = free) fixes tokens (see the module docstring); ``entropy`` stays
    the model's own at pinned positions, ``mean_entropy`` is over the free ones. ``key`` is one
    key [2] or one per row [B, 2].

    Top-k sampling (opt-in, not the reference's): ``logits`` [B, C, K] are each position's K
    largest (:func:`top_k_logits`) and ``token_ids`` [B, C, K] their ids; the softmax, draws and
    entropies are over those K, ``argmax``/``canvas`` hold token ids, ``scaled``/``probs`` stay
    [B, C, K], and renoising draws from ``[0, vocab_size)``.

    ``t`` (float32 scalar array) is the temperature when given (``step``, ``max_steps``, ``t_min``,
    ``t_max`` are then not read): a compiled pass takes it as an input, so one trace serves every step.
    """
    sample_key, noise_key = split_key(key)
    if t is None:
        t = mx.array(temperature(step, max_steps, t_min, t_max), mx.float32)
    u = _uniforms(logits.shape[:-1], sample_key)
    # The per-position work (vocabulary-sized) is spread over the compute streams by canvas rows;
    # with host math its exponentials use every core already, and one piece saves joining two
    # vocabulary-sized halves (measured: 1.33 -> 0.95 s per step over [256, 262144]).
    pieces = []
    ranges = [(0, logits.shape[-2])] if host_math_applies(logits) else split_range(logits.shape[-2])
    for (a, b), stream in zip(ranges, compute_streams()):
        with mx.stream(stream):
            pieces.append(_per_position(logits[..., a:b, :], t, u[..., a:b, :]))
    scaled, argmax, entropy, sampled, probs = (_join(list(p)) for p in zip(*pieces))
    if token_ids is not None:
        argmax = mx.take_along_axis(token_ids, argmax[..., None], axis=-1)[..., 0]
        sampled = mx.take_along_axis(token_ids, sampled[..., None], axis=-1)[..., 0]
    if pinned is None:
        accepted = accept_from_entropy(entropy, entropy_bound)
        mean_entropy = entropy.mean(-1)
        nothing_free = None
    else:
        fixed = pinned >= 0
        argmax, sampled = mx.where(fixed, pinned, argmax), mx.where(fixed, pinned, sampled)
        # Pinned entropies sort last as +inf, so the bound's cumulative sum sees only free ones.
        accepted = accept_from_entropy(mx.where(fixed, mx.inf, entropy), entropy_bound) | fixed
        n_free = (~fixed).sum(-1)
        mean_entropy = mx.where(fixed, 0.0, entropy).sum(-1) / mx.maximum(n_free, 1)
        nothing_free = n_free == 0
    stop = is_stable(history, argmax, stability_threshold) & (mean_entropy < confidence_threshold)
    return StepResult(
        canvas=renoise(accepted, sampled, vocab_size or logits.shape[-1], noise_key),
        argmax=argmax,
        accepted=accepted,
        entropy=entropy,
        mean_entropy=mean_entropy,
        stop=stop if nothing_free is None else stop | nothing_free,
        scaled=scaled,
        probs=probs,
    )


def _join(parts: list[mx.array]) -> mx.array:
    # Per-position results [B, c] or [B, c, V] of consecutive canvas ranges -> the whole canvas.
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)


def _per_position(logits: mx.array, t: mx.array, u: mx.array) -> tuple[mx.array, ...]:
    """Scaled logits, argmax, entropy, one draw and the probabilities of each canvas position."""
    if host_math_applies(logits):
        return _host_per_position(logits, t, u)
    scaled = logits.astype(mx.float32) / t
    argmax = mx.argmax(scaled, axis=-1).astype(mx.int32)
    e, blocks, block_sums, total, entropy = _softmax_parts(scaled, argmax)
    sampled = _inverse_cdf(blocks, block_sums, argmax, u)
    return scaled, argmax, entropy, sampled, e / total[..., None]



# With host math the per-position work is one host pass over each row (a row of the vocabulary
# stays in the core's cache between its steps): the scale, argmax, exponentials and the sum of
# e * z. Only e is written out as a vocabulary-sized array (it becomes the probabilities, normalised
# in place once the draws are made); the scaled logits and e * z stay in per-row scratch, and
# ``scaled`` is returned as the lazy MLX expression (the same division, so the same values),
# computed only if read: a float32 model's self-conditioning reads ``probs``. Each
# vocabulary-sized array is a fresh zero-filled MLX buffer (~0.1 s at [256, 262144] here), so
# writing one instead of three is most of the saving. The sums of e stay MLX's (the same order,
# so the draws and probabilities are the MLX path's bit for bit); the sum of e * z is NumPy's
# (pairwise), so the entropies agree with the MLX path's to float32 rounding. Measured quiet
# (2 cores), the whole `sampler_step`: 0.58-0.62 -> 0.27-0.30 s over [256, 262144], 0.09 -> 0.047 s
# over [256, 32768].
def _host_per_position(logits: mx.array, t: mx.array, u: mx.array) -> tuple[mx.array, ...]:
    temp = np.float32(t.item())
    lead = logits.shape[:-1]
    (e,), rows = host_rows(lambda xs, *outs: _host_exp_parts(xs, *outs, temp=temp), logits, 1,
                           (np.int32, np.float32))
    argmax, ez_sum = (mx.array(r).reshape(lead) for r in rows)
    blocks, block_sums, total, entropy = _softmax_sums(e, argmax, ez_sum)
    sampled = _inverse_cdf(blocks, block_sums, argmax, u)
    mx.eval(sampled, entropy, total)  # before e is overwritten with the probabilities
    probs = host_map(_host_divide, e, total[..., None], in_place=True)[0]
    return logits.astype(mx.float32) / t, argmax, entropy, sampled, probs


def _host_exp_parts(xs: np.ndarray, e: np.ndarray, argmax: np.ndarray, ez_sum: np.ndarray, *, temp) -> None:
    # Rows [n, V]: e = exp(z) with z = x / t - max (as `_exp_terms`), the argmax and sum(e * z).
    scaled = np.divide(xs, temp)
    argmax[:] = scaled.argmax(-1)
    _host_exp_terms(scaled, scaled[np.arange(len(xs)), argmax][:, None], e, scaled)  # e * z over scaled
    ez_sum[:] = scaled.sum(-1)


def _host_divide(xs: np.ndarray, by: np.ndarray, out: np.ndarray) -> None:
    np.divide(xs, by, out=out)
