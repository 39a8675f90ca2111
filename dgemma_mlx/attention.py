"""Attention: causal for ``encode`` (sliding layers windowed), bidirectional over the cached prefix
and the canvas for ``denoise``.

The math is one: softmax (scale 1.0) of q against the keys of every *part* (the cached prefix, the
new tokens), each with an optional additive mask. Two implementations, chosen by the kernel switch
(:func:`dgemma_mlx.ops.cpu_kernels`):

* ``fused`` (Metal, CUDA): one ``mx.fast.scaled_dot_product_attention`` over the parts' keys/values
  (grouped-query heads included): concatenated on sliding layers (a window's worth), and on
  full-attention layers read as one range of the cache buffer, the canvas written past the prefix.
* ``cpu`` (MLX's CPU backend), where each op runs on one core and concatenating the prefix costs a
  copy of it: one softmax merged across the parts without concatenating them, scores in log2
  units so the exponentials are powers of 2 (twice as fast as ``exp`` there), and the kv-head groups
  spread over two streams (:func:`~dgemma_mlx.ops.compute_streams`). Inside host math (inference)
  the softmax is instead one in-place NumPy pass over every head's scores
  (:func:`~dgemma_mlx.ops.host_exp2_rows`; :data:`HOST_SOFTMAX`).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from .cache import FullAttentionCache, SlidingWindowCache
from .config import SLIDING, ModelArgs
from .ops import (LOG2E, compute_streams, cpu_kernels, host_exp2_rows, host_math_for, rms_norm_noscale, shifted_exp2,
                  split_range)

Part = tuple  # (keys [B, kv, K, D], values [B, kv, K, Dv], additive mask [L, K] / [B, 1, L, K] or None)

HOST_SOFTMAX = True
"""Inside host math, the CPU path's softmax is one host pass (:func:`~dgemma_mlx.ops.host_exp2_rows`);
False keeps MLX's ops there (``benchmarks/host_attention.py`` times both)."""


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.is_sliding = args.layer_types[layer] == SLIDING
        self.window = args.sliding_window
        self.n_heads = args.num_attention_heads
        self.n_kv = args.layer_kv_heads[layer]
        self.head_dim = args.layer_head_dims[layer]
        dims, hd = args.hidden_size, self.head_dim
        self.q_proj = nn.Linear(dims, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(dims, self.n_kv * hd, bias=False)
        if self.is_sliding:
            self.v_proj = nn.Linear(dims, self.n_kv * hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * hd, dims, bias=False)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.eps = args.rms_norm_eps
        rope = args.rope_parameters[args.layer_types[layer]]
        self.rope = initialize_rope(
            dims=hd,
            base=rope.get("rope_theta", 10_000.0),
            traditional=False,
            scaling_config=rope,
            max_position_embeddings=args.max_position_embeddings,
        )

    def _qkv(self, x: mx.array, offset: int) -> tuple[mx.array, mx.array, mx.array]:
        """[B, L, H] -> q [B, heads, L, D], k and v [B, kv_heads, L, D] (RoPE at ``offset``)."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, self.head_dim))
        k_raw = self.k_proj(x).reshape(B, L, self.n_kv, self.head_dim)
        v_raw = self.v_proj(x).reshape(B, L, self.n_kv, self.head_dim) if self.is_sliding else k_raw
        k = self.k_norm(k_raw)
        v = rms_norm_noscale(v_raw, self.eps)
        q = self.rope(q.transpose(0, 2, 1, 3), offset=offset)
        k = self.rope(k.transpose(0, 2, 1, 3), offset=offset)
        return q, k, v.transpose(0, 2, 1, 3)

    def _out(self, o: mx.array) -> mx.array:
        B, _, L, _ = o.shape
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def encode(self, x: mx.array, cache, offset: int, groups: Optional[mx.array] = None) -> mx.array:
        """Causal attention of ``x`` over the cached prefix and itself; appends to ``cache``.

        Sliding layers let the query at position p see keys in (p - window, p]. ``groups`` (int
        [L], -1 for text) makes tokens of the same group (one image's tokens, all in ``x``) see
        each other both ways, window or not."""
        L = x.shape[1]
        q, k, v = self._qkv(x, offset)
        kept = cache.kept if isinstance(cache, SlidingWindowCache) else offset
        keys, values = cache.append(k, v)  # views of the stored prefix, then the new tokens
        window = self.window if self.is_sliding else None
        mask = causal_mask(L, 0, window)
        if groups is not None:
            same = (groups[:, None] == groups[None]) & (groups[:, None] >= 0)
            mask = mx.where(same, 0.0, mask)
        parts = [(k, v, mask)]
        if kept:
            prefix_mask = causal_mask(L, kept, window, prefix_only=True) if window else None
            parts.insert(0, (keys[..., :kept, :], values[..., :kept, :], prefix_mask))
        return self._out(attend(q, parts))

    def denoise(self, x: mx.array, cache, offset: int) -> mx.array:
        """Bidirectional attention of the canvas over the cached prefix and the whole canvas.

        The prefix is read in place: it is never concatenated with the canvas keys (the fused
        kernel reads a full-attention layer's prefix and canvas as one range of its buffer)."""
        q, k, v = self._qkv(x, offset)
        if (not cpu_kernels() and isinstance(cache, FullAttentionCache) and cache.offset
                and cache.keys.shape[0] == k.shape[0] and cache.keys.dtype == k.dtype):
            return self._out(attend(q, [(*cache.with_canvas(k, v), None)]))
        prefix = cache.prefix() if cache is not None else None
        parts = [(k, v, None)] if prefix is None else [(*prefix, cache.prefix_mask()), (k, v, None)]
        return self._out(attend(q, parts))


def causal_mask(L: int, kept: int, window: Optional[int], prefix_only: bool = False) -> mx.array:
    """Additive mask [L, K] for L queries that follow ``kept`` earlier keys.

    ``prefix_only``: the keys are the ``kept`` earlier ones (K = kept); otherwise the L new ones.
    A query i may see key j when j is not after it and, with a window, fewer than ``window``
    positions before it."""
    q = mx.arange(L)[:, None] + kept
    k = mx.arange(kept if prefix_only else L)[None] + (0 if prefix_only else kept)
    allowed = k <= q
    if window:
        allowed = allowed & (k > q - window)
    return mx.where(allowed, 0.0, -mx.inf).astype(mx.float32)


def attend(q: mx.array, parts: list) -> mx.array:
    """Attention (scale 1.0) of q [B, H, L, D] over key/value parts [B, kv, K_i, D] with optional
    additive masks [L, K_i] or, per row, [B, 1, L, K_i]: one softmax across all parts. Query heads
    share key/value heads in groups (kv-major). Returns [B, H, L, Dv]."""
    return _attend_cpu(q, parts) if cpu_kernels() else _attend_fused(q, parts)


def _attend_fused(q: mx.array, parts: list) -> mx.array:
    """:func:`attend` as one fused kernel over the concatenated parts."""
    B = q.shape[0]  # a batch of canvases shares a one-row prefix
    keys = [k if k.shape[0] == B else mx.broadcast_to(k, (B, *k.shape[1:])) for k, _, _ in parts]
    values = [v if v.shape[0] == B else mx.broadcast_to(v, (B, *v.shape[1:])) for _, v, _ in parts]
    k = keys[0] if len(keys) == 1 else mx.concatenate(keys, axis=2)
    v = values[0] if len(values) == 1 else mx.concatenate(values, axis=2)
    mask = None
    if any(m is not None for _, _, m in parts):
        L = q.shape[2]
        pieces = []
        for kk, _, m in parts:
            if m is None:
                m = mx.zeros((L, kk.shape[2]), mx.float32)
            pieces.append(m if m.ndim == 4 else m[None, None])
        shape = (max(p.shape[0] for p in pieces), 1, L)
        mask = mx.concatenate([mx.broadcast_to(p, (*shape, p.shape[-1])) for p in pieces], axis=-1)
        mask = mask.astype(q.dtype) if q.dtype != mx.float32 else mask
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)


def _attend_cpu(q: mx.array, parts: list) -> mx.array:
    """:func:`attend` for MLX's CPU backend: one softmax across all parts computed without
    concatenating them (the prefix is read in place), in log2 units (base-2 exponentials).

    Query heads share key/value heads in groups (GQA, kv-major). Groups of kv heads are spread
    over :func:`compute_streams` (on the CPU, MLX runs each op on one core).
    """
    B, H, L, D = q.shape
    n_kv = parts[0][0].shape[1]
    rep = H // n_kv
    # Scores in log2 units, so the softmax uses powers of 2 (see ops.LOG2E). In float32 the factor
    # is folded into q; in half precision it is applied to the float32 scores, so q is not rounded
    # once more.
    fold = q.dtype == mx.float32
    if fold:
        q = q * LOG2E
    # Inside host math (inference passes) the softmax is one in-place host pass over every
    # head's scores (:func:`~dgemma_mlx.ops.host_exp2_rows`), which spreads its rows over the
    # cores itself, so the heads stay together.
    host = HOST_SOFTMAX and fold and host_math_for(mx.float32, B * H * L * sum(k.shape[2] for k, _, _ in parts))
    outs = []
    for (a, b), stream in zip([(0, n_kv)] if host else split_range(n_kv), compute_streams()):
        with mx.stream(stream):
            qg = q[:, a * rep : b * rep].reshape(B, b - a, rep * L, D)
            scores, values = [], []
            for k, v, mask in parts:
                s = (qg @ k[:, a:b].swapaxes(-1, -2)).astype(mx.float32)
                if not fold:
                    s = s * LOG2E
                if mask is not None:
                    m = mask[:, :, None] if mask.ndim == 4 else mask  # [B, 1, L, K] -> per group
                    s = (s.reshape(B, b - a, rep, L, -1) + m).reshape(s.shape)
                scores.append(s)
                values.append(v[:, a:b])
            outs.append(_merge_softmax(scores, values, host=host).reshape(B, (b - a) * rep, L, -1))
    return mx.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]


def _merge_softmax(scores: list[mx.array], values: list[mx.array], host: bool = False) -> mx.array:
    """``softmax(concat(scores)) @ concat(values)`` from the parts, for scores in log2 units
    (float32 softmax). ``host``: the scores are fresh float32 buffers, overwritten by the
    exponentials on the host (inference only)."""
    dt = values[0].dtype
    if host:
        exps = host_exp2_rows(scores)
    else:
        m = scores[0].max(axis=-1, keepdims=True)
        for s in scores[1:]:
            m = mx.maximum(m, s.max(axis=-1, keepdims=True))
        exps = [shifted_exp2(s, m) for s in scores]
    out = denom = None
    for e, v in zip(exps, values):
        part, total = e.astype(dt) @ v, e.sum(axis=-1, keepdims=True)
        out = part if out is None else out + part
        denom = total if denom is None else denom + total
    return (out.astype(mx.float32) / denom).astype(dt)
