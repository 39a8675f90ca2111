"""DiffusionGemma's block-diffusion training objective (the recipe TRL, NeMo and Google's SFT share).

Per example (right-padded batch of clean sequences, ``response_mask`` marking the supervised tokens,
which form one contiguous span: the response):

* one response block of ``C = canvas_length`` tokens is chosen (``block_index``); the clean canvas is
  that block, EOS-filled past the end of the response (the fill is supervised);
* the encoder (causal) reads the whole clean sequence; the denoiser reads exactly the cache that
  encoding the tokens *before* the block would produce, as at inference: full-attention layers see
  every earlier token, sliding layers only the last ``window - 1`` of them (TRL's single batched
  pass lets sliding layers see the end of the sequence instead; the two agree when sequences fit
  the window);
* the canvas is corrupted (``t ~ U(1e-3, 1)`` per example; each position replaced by a uniform
  random vocabulary id with probability ``t``; no mask token);
* a first denoising pass without gradients gives logits that self-condition the second pass for the
  examples whose coin came up (``self_conditioning_mask``);
* loss = mean cross-entropy over every canvas position (no ``1/t`` weighting) + ``encoder_weight``
  x the encoder's causal next-token cross-entropy over all valid pairs (tied head, soft-capped).

``blocks_per_example`` K > 1 (ours, off by default) denoises K blocks of each example, each with its
own block choice, corruption and coin, all reading the one encoder pass: the same loss in
expectation as K examples, with K times the denoiser's training signal for one encoder pass
(canvas rows are example-major: rows ``k*K ... k*K + K-1`` belong to example ``k``).

``ordered_p`` (ours, 0 by default) is the share of canvases corrupted *in order*: a cut is drawn
uniformly in ``0 .. C-1`` and the reference's corruption applies only from the cut onward, the tokens
left of it staying clean. Those are the states a left-to-right denoising run passes through (a
clean prefix, noise after it), which iid corruption almost never produces for long prefixes.

:func:`block_diffusion_loss` is the deterministic core (the random draws are inputs);
:func:`sample_draws` makes the draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import numpy as np

from ..cache import _LayerCache
from ..ops import LOG2E, shifted_exp2

EPS = 1e-3  # minimum corruption ratio (TRL's eps): avoids uncorrupted canvases


@dataclass
class Draws:
    """The random draws of one training step."""

    block_index: mx.array  # int32 [B]: the response block each example trains on
    canvas_ids: mx.array  # int32 [B, C]: the corrupted canvas
    self_conditioning_mask: mx.array  # bool [B]: examples whose second pass is self-conditioned
    targets: mx.array  # int32 [B, C]: the clean canvas


def response_span(response_mask: mx.array) -> tuple[mx.array, mx.array]:
    """First supervised position and number of supervised tokens per row: [B, L] -> [B], [B]."""
    supervised = response_mask.astype(mx.int32)
    return mx.argmax(supervised, axis=1).astype(mx.int32), supervised.sum(axis=1)


def num_blocks(response_mask: mx.array, canvas_length: int) -> mx.array:
    """Response blocks per example (at least one): int32 [B]."""
    _, length = response_span(response_mask)
    return mx.maximum(length - 1, 0) // canvas_length + 1


def canvas_targets(
    input_ids: mx.array, response_mask: mx.array, block_index: mx.array, canvas_length: int, eos_id: int
) -> tuple[mx.array, mx.array]:
    """The clean canvas [B, C] of each example's block, EOS past the response's end, and where the
    block starts (the denoiser's cache length) [B]."""
    start, length = response_span(response_mask)
    cut = start + block_index * canvas_length
    offsets = mx.arange(canvas_length)
    positions = mx.minimum(cut[:, None] + offsets, input_ids.shape[1] - 1)
    inside = offsets[None] < (length - block_index * canvas_length)[:, None]
    clean = mx.take_along_axis(input_ids, positions, axis=1)
    return mx.where(inside, clean, eos_id).astype(mx.int32), cut


def sample_draws(
    key: mx.array,
    input_ids: mx.array,
    response_mask: mx.array,
    *,
    canvas_length: int,
    vocab_size: int,
    eos_id: int,
    t_range: tuple[float, float] = (EPS, 1.0),
    self_conditioning_p: float = 0.5,
    blocks_per_example: int = 1,
    ordered_p: float = 0.0,
) -> Draws:
    """Block choice, corruption and self-conditioning coins for one batch.

    ``t_range`` bounds the per-example corruption ratio (default ``U(1e-3, 1)``, the reference's;
    a higher floor is a curriculum for from-scratch training). With ``blocks_per_example`` K the
    draws are for ``B * K`` canvases, example-major (blocks drawn independently, with replacement).
    ``ordered_p`` > 0 corrupts that share of canvases only from a random cut onward (module
    docstring); at 0 the draws are the reference's, bit for bit."""
    if blocks_per_example > 1:
        input_ids = mx.repeat(input_ids, blocks_per_example, axis=0)
        response_mask = mx.repeat(response_mask, blocks_per_example, axis=0)
    B = input_ids.shape[0]
    k_block, k_t, k_pos, k_tok, k_sc = mx.random.split(key, 5)
    blocks = num_blocks(response_mask, canvas_length)
    block_index = mx.minimum(
        (mx.random.uniform(shape=(B,), key=k_block) * blocks).astype(mx.int32), blocks - 1
    )
    targets, _ = canvas_targets(input_ids, response_mask, block_index, canvas_length, eos_id)
    lo, hi = t_range
    t = lo + (hi - lo) * mx.random.uniform(shape=(B, 1), key=k_t)
    if ordered_p > 0:
        k_pos, k_ordered, k_cut = mx.random.split(k_pos, 3)
    corrupt = mx.random.uniform(shape=(B, canvas_length), key=k_pos) < t
    if ordered_p > 0:
        ordered = mx.random.uniform(shape=(B, 1), key=k_ordered) < ordered_p
        cut = mx.random.randint(0, canvas_length, (B, 1), key=k_cut)
        corrupt = corrupt & (~ordered | (mx.arange(canvas_length)[None] >= cut))
    noise = mx.random.randint(0, vocab_size, (B, canvas_length), dtype=mx.int32, key=k_tok)
    canvas = mx.where(corrupt, noise, targets)
    sc = mx.random.uniform(shape=(B,), key=k_sc) < self_conditioning_p
    return Draws(block_index, canvas, sc, targets)


def prefix_length(response_mask, block_index, canvas_length: int) -> int:
    """Tokens the encoder must read without the encoder loss: the largest block start (>= 1).
    ``response_mask`` [B, L] and ``block_index`` [B], numpy or MLX."""
    rm = np.asarray(response_mask).astype(bool)
    start = rm.argmax(axis=1)
    cut = start + np.asarray(block_index).astype(np.int64) * canvas_length
    return max(int(cut.max()), 1)


class _Recorder(_LayerCache):
    """Layer cache for the training encoder: keeps the keys/values of the whole sequence."""

    def append(self, keys: mx.array, values: mx.array):
        self.keys, self.values = keys, values
        return keys, values


class _CutPrefix(_LayerCache):
    """The encoder's keys/values of the whole sequence, masked per row to what the denoiser of
    that row may read: positions in ``[lo, cut)`` (``lo = cut - (window - 1)`` on sliding layers)."""

    def __init__(self, keys: mx.array, values: mx.array, mask: mx.array):
        self.keys, self.values, self._mask = keys, values, mask

    def prefix(self):
        return self.keys, self.values

    def prefix_mask(self) -> mx.array:
        return self._mask


class _TrainingPrefix:
    """What :meth:`Model.denoise` needs of a cache: ``layers`` and ``offset`` (one per row)."""

    def __init__(self, layers: list, offset: mx.array):
        self.layers, self.offset = layers, offset


def _cut_mask(cut: mx.array, length: int, window: Optional[int], canvas_length: int) -> mx.array:
    # Additive mask [B, 1, C, L] over the sequence keys for each row's canvas queries.
    j = mx.arange(length)[None]
    allowed = j < cut[:, None]
    if window:
        allowed = allowed & (j >= cut[:, None] - (window - 1))
    mask = mx.where(allowed, 0.0, -mx.inf).astype(mx.float32)
    return mx.broadcast_to(mask[:, None, None, :], (cut.shape[0], 1, canvas_length, length))


def cross_entropy(logits: mx.array, targets: mx.array, valid: Optional[mx.array] = None) -> mx.array:
    """Mean cross-entropy of float logits [..., V] against int targets [...] over ``valid``."""
    logits = logits.astype(mx.float32)
    m = mx.stop_gradient(logits.max(axis=-1, keepdims=True))
    lse = m[..., 0] + mx.log(shifted_exp2(logits * LOG2E, m * LOG2E).sum(axis=-1))
    ce = lse - mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    if valid is None:
        return ce.mean()
    valid = valid.astype(ce.dtype)
    return (ce * valid).sum() / mx.maximum(valid.sum(), 1.0)


def block_diffusion_loss(
    model,
    input_ids: mx.array,
    attention_mask: mx.array,
    response_mask: mx.array,
    block_index: mx.array,
    canvas_ids: mx.array,
    self_conditioning_mask: mx.array,
    *,
    eos_id: int,
    encoder_weight: float = 1.0,
    prefix_length: Optional[int] = None,
) -> tuple[mx.array, mx.array, mx.array]:
    """``(loss, diffusion_loss, encoder_loss)`` of one batch (scalars).

    Args:
        input_ids: int [B, L] clean sequences, right-padded.
        attention_mask: [B, L], 1 on real tokens.
        response_mask: [B, L], 1 on the supervised (response) tokens: one contiguous span a row.
        block_index: int [B*K], the response block each canvas trains on (K blocks per example,
            example-major; K = 1 is the reference's one block per example).
        canvas_ids: int [B*K, C], those blocks corrupted.
        self_conditioning_mask: bool [B*K], canvases whose second pass is self-conditioned.
        eos_id: the id filling the canvas past the response's end.
        encoder_weight: weight of the encoder's causal-LM loss.
        prefix_length: without the encoder loss, how many leading tokens to encode (at least the
            largest block start, see :func:`prefix_length`); computed here when not given (a host
            synchronisation, so a compiled step passes it).
    """
    args = model.args
    C = canvas_ids.shape[1]
    L = input_ids.shape[1]
    K = canvas_ids.shape[0] // input_ids.shape[0]
    each = (lambda x: mx.repeat(x, K, axis=0)) if K > 1 else (lambda x: x)  # per example -> per canvas
    targets, cut = canvas_targets(each(input_ids), each(response_mask), block_index, C, eos_id)

    if not encoder_weight:
        # Without the encoder loss only the tokens before the last block start are needed.
        L = prefix_length or max(int(cut.max().item()), 1)
        input_ids = input_ids[:, :L]
    recorders = [_Recorder() for _ in model.layers]
    hidden = model.encoder_pass(input_ids, recorders, 0)
    if encoder_weight:
        valid = attention_mask.astype(mx.bool_)
        pairs = valid[:, :-1] & valid[:, 1:]
        enc_logits = model.logits(hidden[:, :-1])
        encoder_loss = cross_entropy(enc_logits, input_ids[:, 1:], pairs)
    else:
        encoder_loss = mx.array(0.0)

    masks = {}
    layers = []
    for layer, rec in zip(model.layers, recorders):
        window = args.sliding_window if layer.self_attn.is_sliding else None
        if window not in masks:
            masks[window] = _cut_mask(cut, L, window, C)
        layers.append(_CutPrefix(each(rec.keys), each(rec.values), masks[window]))
    prefix = _TrainingPrefix(layers, cut)

    first = mx.stop_gradient(model.denoise(canvas_ids, prefix))
    logits = model.denoise(
        canvas_ids, prefix, first, self_conditioning_mask=self_conditioning_mask
    )
    diffusion_loss = cross_entropy(logits, targets)
    return diffusion_loss + encoder_weight * encoder_loss, diffusion_loss, encoder_loss
