"""The GPU path's denoising pass as one compiled graph (:class:`CompiledPass`).

With the fused kernels (:func:`~dgemma_mlx.ops.cpu_kernels` off: Metal, or MLX's CUDA backend),
:func:`~dgemma_mlx.refine.refine_block` runs a block's passes after the first through a
:class:`CompiledPass`: the model's denoise and the sampler step traced once with ``mx.compile`` and
replayed. Elementwise chains then fuse across module boundaries (the vocabulary-sized soft cap,
softmax, entropy and draws), and Python builds the graph once per block instead of once per pass.
Nothing inside waits for the host (MLX refuses an evaluation inside a compiled function).

Everything that changes from pass to pass is an array input: the canvas, the self-conditioning
signal, the previous argmax canvases (always ``stability_threshold`` of them, padded in front with
-1 canvases, which equal no argmax, so the stop rule is unchanged), the pinned tokens, the key and the
temperature. The prefix's keys/values are inputs too. They are only read: the eager fused path writes
the canvas's keys into a full-attention buffer's spare room, which a pure function cannot do, so
here the canvas's keys are concatenated after the prefix's (a copy of the prefix's keys per pass,
small next to the pass's weights).

One instance serves one block (one prefix). A smaller batch (rows that stopped dropped) traces again;
the trace is dropped with the instance. The first pass of a block runs eagerly: it has no
self-conditioning signal, so its graph differs, and it would be traced for one use.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from .sampler import StepResult, sampler_step, temperature, top_k_logits


class _PrefixLayer:
    """One layer's cached prefix as :meth:`~dgemma_mlx.attention.Attention.denoise` reads it."""

    def __init__(self, kv: Optional[tuple[mx.array, mx.array]], mask: Optional[mx.array]) -> None:
        self.kv, self.mask = kv, mask

    def prefix(self):
        return self.kv

    def prefix_mask(self):
        return self.mask


class _PrefixView:
    """A read-only stand-in for a :class:`~dgemma_mlx.cache.PrefixCache` inside the trace."""

    def __init__(self, kv: list, masks: list, offset: mx.array) -> None:
        self.layers = [_PrefixLayer(p, m) for p, m in zip(kv, masks)]
        self.offset = offset


class CompiledPass:
    """A block's later passes (model denoise + :func:`~dgemma_mlx.sampler.sampler_step`) compiled.

    ``__call__`` has the contract of ``refine._pass`` for a pass that has a self-conditioning
    signal: ``(logits [B, C, V], StepResult, ids)``, ``ids`` [B, C, K] the token ids of the top-k
    logits with ``top_k`` (else None).

    Args:
        model: the :class:`~dgemma_mlx.model.Model` (its parameters are inputs of the trace).
        cache: the block's prefix cache (read when the instance is made; not modified).
        top_k: the sampler's top-k (0: the whole vocabulary).
        sampling: the constant part of the sampler's arguments (``t_min``, ``t_max``,
            ``entropy_bound``, ``confidence_threshold``, ``stability_threshold``).
    """

    def __init__(self, model, cache, *, top_k: int, sampling: dict) -> None:
        self.model = model
        self.top_k = top_k
        self.t_min, self.t_max = sampling["t_min"], sampling["t_max"]
        self.entropy_bound = sampling["entropy_bound"]
        self.confidence_threshold = sampling["confidence_threshold"]
        self.stability_threshold = sampling["stability_threshold"]
        self.use_probs = model.dtype == mx.float32
        # Layers with an empty prefix (a first block after nothing) get an empty list, not None.
        self.prefix = [list(c.prefix() or ()) for c in cache.layers]
        self.masks = []
        for c in cache.layers:
            mask = c.prefix_mask()
            self.masks.append([] if mask is None else [mask])
        offset = cache.offset
        self.offset = offset if isinstance(offset, mx.array) else mx.array(offset, mx.int32)
        self._fn = mx.compile(self._graph, inputs=model.state)

    def _graph(self, canvas, prefix, masks, offset, signal, ids, history, pinned, key, t):
        view = _PrefixView([tuple(p) or None for p in prefix], [m[0] if m else None for m in masks], offset)
        sc_ids = ids[0] if ids else None
        if self.use_probs:
            logits = self.model.denoise(canvas, view, None, self_conditioning_probs=signal, self_conditioning_ids=sc_ids)
        else:
            logits = self.model.denoise(canvas, view, signal, self_conditioning_ids=sc_ids)
        values, tokens = (logits, None) if not self.top_k else top_k_logits(logits, self.top_k)
        r = sampler_step(
            values, step=0, max_steps=1, t_min=self.t_min, t_max=self.t_max, t=t,
            entropy_bound=self.entropy_bound, confidence_threshold=self.confidence_threshold,
            history=history, stability_threshold=self.stability_threshold, key=key,
            pinned=pinned[0] if pinned else None, token_ids=tokens,
            vocab_size=logits.shape[-1] if self.top_k else None,
        )
        return logits, [] if tokens is None else [tokens], vars(r)

    def __call__(self, canvas: mx.array, signal: mx.array, signal_ids: Optional[mx.array], *, step: int,
                 max_steps: int, key: mx.array, history: list[mx.array], pinned: Optional[mx.array]):
        """One pass. ``signal``: the previous pass's probabilities (float32 model) or its
        temperature-scaled logits (half-precision model), [B, C, V] or [B, C, K] over
        ``signal_ids``; ``history``: the block's previous argmax canvases, oldest first."""
        n = self.stability_threshold
        recent = history[-n:] if n else []
        pad = [mx.full(canvas.shape, -1, mx.int32)] * (n - len(recent))
        t = mx.array(temperature(step, max_steps, self.t_min, self.t_max), mx.float32)
        logits, tokens, fields = self._fn(
            canvas, self.prefix, self.masks, self.offset, signal,
            [] if signal_ids is None else [signal_ids], pad + recent,
            [] if pinned is None else [pinned], key, t,
        )
        return logits, StepResult(**fields), tokens[0] if tokens else None
