"""DiffusionGemma's text model in MLX.

One set of weights runs two ways:

* :meth:`Model.encode` — the causal pass. Writes the prompt (and later each committed block) into a
  :class:`~dgemma_mlx.cache.PrefixCache`, using the encoder's ``layer_scalar`` set.
* :meth:`Model.denoise` — the bidirectional pass over a canvas placed right after the cached tokens.
  Every canvas token attends to the whole canvas and to the cache (full layers: all of it; sliding
  layers: its last ``window - 1`` tokens). Reads the cache without writing it and uses the
  decoder's ``layer_scalar`` set. Returns float32 soft-capped logits.

Layer: ``r = x + post_attn_norm(attn(input_norm(x)))``; then
``(r + post_ff_norm(post_ff_norm_1(mlp(pre_ff_norm(r))) + post_ff_norm_2(experts(pre_ff_norm_2(r)))))``
times ``layer_scalar``. The router reads ``r``. Attention uses scale 1.0 with RMS-normed q/k
(and a scale-free RMS norm on v); full layers have no v_proj (values come from k_proj).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from .adapters import encoding_pass
from .cache import FullAttentionCache, PrefixCache, SlidingWindowCache
from .config import FULL, ModelArgs
from .experts import Experts
from .attention import Attention
from .ops import gelu_mul, host_math, rms_norm_noscale, rows_in_parallel, softcap, softmax
from .vision import MultimodalEmbedder, VisionTower, sanitize_vision_key


class MLP(nn.Module):
    """Gated GELU (tanh) MLP: ``down(gelu(gate(x)) * up(x))``."""

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dims, hidden, bias=False)
        self.up_proj = nn.Linear(dims, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dims, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu_mul(self.gate_proj(x), self.up_proj(x)))


class Router(nn.Module):
    """Top-k expert routing: scale-free RMS norm, times ``scale * H**-0.5``, linear, softmax over
    all experts, top-k, renormalise, times ``per_expert_scale``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.top_k = args.top_k_experts
        self.root_size = args.hidden_size**-0.5
        self.proj = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.scale = mx.ones((args.hidden_size,))
        self.per_expert_scale = mx.ones((args.num_experts,))

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """``x``: [N, H]. Returns expert ids [N, k] (uint32) and weights [N, k] (float32)."""
        h = rms_norm_noscale(x, self.eps) * self.scale * self.root_size
        probs = mx.softmax(self.proj(h).astype(mx.float32), axis=-1)
        k = self.top_k
        idx = mx.stop_gradient(mx.argpartition(-probs, kth=k - 1, axis=-1)[..., :k])
        w = mx.take_along_axis(probs, idx, axis=-1)
        w = w / w.sum(axis=-1, keepdims=True)
        w = w * self.per_expert_scale[idx].astype(mx.float32)
        return idx.astype(mx.uint32), w


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = Attention(args, layer)
        self.mlp = MLP(H, args.intermediate_size)
        self.router = Router(args)
        self.experts = Experts(H, args.moe_intermediate_size, args.num_experts, args.top_k_experts)
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm_1 = nn.RMSNorm(H, eps=eps)
        self.pre_feedforward_layernorm_2 = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm_2 = nn.RMSNorm(H, eps=eps)
        self.layer_scalar = mx.ones((1,))  # decoder (denoise) scalar
        self.encoder_layer_scalar = mx.ones((1,))  # encoder (encode) scalar

    def __call__(self, x: mx.array, cache, offset: int, encode: bool, groups: Optional[mx.array] = None) -> mx.array:
        """``groups``: see :meth:`Attention.encode` (encode passes only)."""
        y = self.input_layernorm(x)
        h = self.self_attn.encode(y, cache, offset, groups) if encode else self.self_attn.denoise(y, cache, offset)
        r = x + self.post_attention_layernorm(h)

        dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(r)))
        flat = r.reshape(-1, r.shape[-1])
        idx, w = self.router(flat)
        moe = self.experts(self.pre_feedforward_layernorm_2(flat), idx, w).reshape(r.shape)
        moe = self.post_feedforward_layernorm_2(moe)
        out = r + self.post_feedforward_layernorm(dense + moe)
        return out * (self.encoder_layer_scalar if encode else self.layer_scalar)


class SelfConditioning(nn.Module):
    """Mixes the previous step's soft prediction into the canvas embedding:
    ``rms_norm_noscale(embed + down(gelu(gate(n)) * up(n)))`` with ``n = pre_norm(soft)``."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.eps = args.rms_norm_eps
        self.pre_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, embeds: mx.array, soft: Optional[mx.array]) -> mx.array:
        if soft is not None:
            n = self.pre_norm(soft)
            embeds = embeds + self.down_proj(gelu_mul(self.gate_proj(n), self.up_proj(n)))
        # With no soft input the MLP's output is exactly zero (gelu(0) = 0), so it is skipped.
        return rms_norm_noscale(embeds, self.eps)


@dataclass(frozen=True)
class Source:
    """Where a loaded model came from (kept out of the module tree, so not a parameter)."""

    path: Optional[Path] = None
    generation_config: dict = field(default_factory=dict)


class Model(nn.Module):
    """The DiffusionGemma text model. Weights are shared by :meth:`encode` and :meth:`denoise`."""

    source: Source = Source()

    @property
    def path(self) -> Optional[Path]:
        return self.source.path

    @property
    def generation_config(self) -> dict:
        """The checkpoint's ``generation_config.json`` (nulls dropped; {} when absent)."""
        return self.source.generation_config

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.self_conditioning = SelfConditioning(args)
        if args.vision is not None:
            self.vision_tower = VisionTower(args.vision)
            self.embed_vision = MultimodalEmbedder(args.vision.hidden_size, args.hidden_size, args.vision.rms_norm_eps)
        self.encode_chunk_size = 512

    # ----------------------------------------------------------------------------------- cache
    def make_cache(self) -> PrefixCache:
        return PrefixCache(
            [
                FullAttentionCache() if t == FULL else SlidingWindowCache(self.args.sliding_window)
                for t in self.args.layer_types
            ]
        )

    @property
    def host_syncs(self) -> bool:
        """Whether a pass waits for the device partway (an expert strategy that reads the routing
        counts on the host), which rules out compiling it."""
        return any(layer.experts.host_syncs for layer in self.layers)

    # ------------------------------------------------------------------------------ embeddings
    @property
    def dtype(self) -> mx.Dtype:
        e = self.embed_tokens
        return e.scales.dtype if isinstance(e, nn.QuantizedEmbedding) else e.weight.dtype

    def _embed(self, ids: mx.array) -> mx.array:
        h = self.embed_tokens(ids)
        return h * mx.array(self.args.embed_scale, dtype=h.dtype)

    def soft_embedding(self, probs: mx.array, ids: Optional[mx.array] = None) -> mx.array:
        """``probs @ E * sqrt(H)`` for a distribution over the vocabulary ([..., V] -> [..., H]).

        With ``ids`` (int [..., K]) the distribution is sparse: ``probs`` [..., K] is the mass of
        those tokens, and only their K rows of E are read. Works on a quantized embedding too (one
        quantized matmul, no dequantized copy of E)."""
        e = self.embed_tokens
        dt = self.dtype
        p = probs.astype(dt)
        if ids is not None:
            rows = e(ids)  # [..., K, H]
            return (p[..., None, :] @ rows)[..., 0, :] * mx.array(self.args.embed_scale, dtype=dt)
        if isinstance(e, nn.QuantizedEmbedding):
            soft = mx.quantized_matmul(
                p, e.weight, e.scales, e.get("biases"), transpose=False,
                group_size=e.group_size, bits=e.bits, mode=e.mode,
            )
        else:
            soft = p @ e.weight
        return soft * mx.array(self.args.embed_scale, dtype=dt)

    def self_conditioning_embedding(self, logits: Optional[mx.array] = None, *, probs: Optional[mx.array] = None,
                                    ids: Optional[mx.array] = None) -> Optional[mx.array]:
        """The self-conditioning signal's soft embedding [..., H] from the previous pass's
        temperature-scaled ``logits`` [..., V], or from their softmax ``probs`` (sparse over ``ids``
        [..., K] when given, see :meth:`soft_embedding`); None when there is no signal."""
        if probs is None and logits is not None:
            # The reference keeps these logits in the embedding dtype before its softmax.
            probs = rows_in_parallel(softmax, logits.astype(self.dtype).astype(mx.float32))
        return None if probs is None else self.soft_embedding(probs, ids)

    def logits(self, h: mx.array) -> mx.array:
        """Final norm, tied head, float32, soft cap ([B, L, H] -> [B, L, V])."""
        out = self.embed_tokens.as_linear(self.norm(h)).astype(mx.float32)
        cap = self.args.final_logit_softcapping
        if cap:
            out = rows_in_parallel(lambda x: softcap(x, cap, temporary=True), out)  # out: the head's fresh output
        return out

    # ---------------------------------------------------------------------------------- passes
    def encode(
        self,
        ids: mx.array,
        cache: PrefixCache,
        chunk_size: Optional[int] = None,
        *,
        image_features: Optional[mx.array] = None,
    ) -> None:
        """Causal pass over ``ids`` (int [B, L]) that appends their keys/values to ``cache``.

        Long inputs are processed in chunks of ``chunk_size`` tokens (default
        ``self.encode_chunk_size``); the result is the same as one pass.

        ``image_features`` ([N, H], from :func:`dgemma_mlx.multimodal.image_features`) replace the
        embeddings of the N image tokens (``args.image_token_id``) of ``ids`` (batch 1), in order;
        each run of image tokens (one image) attends to itself bidirectionally, and a chunk never
        splits a run.

        Each chunk is evaluated before the next, so this is for inference: with the CPU kernels
        its attention softmax runs on the host (:func:`~dgemma_mlx.ops.host_math`). Training
        drives :meth:`encoder_pass` itself.
        """
        if ids.ndim == 1:
            ids = ids[None]
        step = chunk_size or self.encode_chunk_size
        if image_features is not None:
            from .multimodal import encode_chunks

            chunks = encode_chunks(self, ids, image_features, step)
        else:
            chunks = ((ids[:, start : start + step], None) for start in range(0, ids.shape[1], step))
        for chunk, images in chunks:
            with host_math():
                self.encoder_pass(chunk, cache.layers, cache.offset, images)
                cache.advance(chunk.shape[1])
                mx.eval(cache.arrays())

    def encoder_pass(self, ids: mx.array, layer_caches: list, offset: int, images=None) -> mx.array:
        """One causal pass of ``ids`` (int [B, L]) at positions ``offset...``, appending to each of
        ``layer_caches``; returns the last hidden states [B, L, H] (before the final norm).

        :meth:`encode` drives it over a :class:`PrefixCache`; training gives it recording caches
        so the encoder's keys/values and hidden states stay in the autodiff graph. ``images``
        (:class:`~dgemma_mlx.multimodal.ChunkImages`) puts image features at their tokens and makes
        each image's tokens attend to each other both ways."""
        with encoding_pass():
            h = self._embed(ids)
            groups = None
            if images is not None:
                h[0, images.positions] = images.features.astype(h.dtype)
                groups = images.groups
            for layer, c in zip(self.layers, layer_caches):
                h = layer(h, c, offset, encode=True, groups=groups)
        return h

    def denoise(
        self,
        canvas: mx.array,
        cache: PrefixCache,
        self_conditioning_logits: Optional[mx.array] = None,
        *,
        self_conditioning_probs: Optional[mx.array] = None,
        self_conditioning_mask: Optional[mx.array] = None,
        self_conditioning_ids: Optional[mx.array] = None,
        self_conditioning_embedding: Optional[mx.array] = None,
        positions: Optional[mx.array] = None,
    ) -> mx.array:
        """Logits (float32 [B, C, V], soft-capped) for ``canvas`` (int [B, C]) placed after the cache.

        ``self_conditioning_logits`` are the previous step's temperature-scaled logits [B, C, V]
        (None on a canvas's first step). ``self_conditioning_probs`` may be given instead: their
        softmax, when the caller already has it. ``self_conditioning_mask`` (bool [B]) zeroes the
        signal of the rows where it is False (training: self-conditioning per example). The cache is
        not modified; its ``offset`` may be an int array [B] (one canvas position per row).
        ``self_conditioning_ids`` (int [B, C, K]) makes ``self_conditioning_probs`` sparse: [B, C, K],
        the probabilities of those tokens (top-k sampling). ``self_conditioning_embedding``
        ([B, C, H], from :meth:`self_conditioning_embedding`) replaces all three: the signal's soft
        embedding, already computed (a caller that keeps it per position). ``positions`` (int
        [B, K]) asks for the logits of those canvas positions only ([B, K, V]): the LM head, the
        largest matmul with a real vocabulary, then runs on K positions, not C.
        """
        if canvas.ndim == 1:
            canvas = canvas[None]
        h = self._embed(canvas)
        soft = self_conditioning_embedding
        if soft is None:
            soft = self.self_conditioning_embedding(
                self_conditioning_logits, probs=self_conditioning_probs, ids=self_conditioning_ids)
        if soft is not None and self_conditioning_mask is not None:
            soft = soft * self_conditioning_mask.astype(soft.dtype)[:, None, None]
        h = self.self_conditioning(h, soft)
        offset = cache.offset
        for layer, c in zip(self.layers, cache.layers):
            h = layer(h, c, offset, encode=False)
        if positions is not None:
            h = mx.take_along_axis(h, positions[..., None].astype(mx.int32), axis=1)
        return self.logits(h)

    # -------------------------------------------------------------------------------- weights
    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map checkpoint names (transformers, mlx-vlm, or ours) onto this module tree.

        Vision weights become ``vision_tower.*`` / ``embed_vision.*`` (dropped for a text-only
        model); the tied ``lm_head`` is dropped; the encoder's own layer scalars become
        ``layers.N.encoder_layer_scalar``; fused expert tensors get a ``.weight`` suffix.
        """
        out = {}
        for key, value in weights.items():
            if "rotary_emb" in key:
                continue
            vision_key = sanitize_vision_key(key)
            if vision_key is not None:
                if self.args.vision is not None:
                    out[vision_key] = value
                continue
            if key.endswith("lm_head.weight") or key.startswith("lm_head."):
                continue
            if ".encoder.language_model." in key or key.startswith("encoder.language_model."):
                if key.endswith(".layer_scalar"):
                    layer = key.split(".layers.")[1].split(".")[0]
                    out[f"layers.{layer}.encoder_layer_scalar"] = value
                continue  # the encoder's text weights are tied to the decoder's
            if "decoder." in key:
                key = key.split("decoder.", 1)[1]
            if key.endswith(".experts.gate_up_proj") or key.endswith(".experts.down_proj"):
                key += ".weight"
            out[key] = value
        return out

    def quantization_recipe(self, expert_bits: int, group_size: int, mode: str = "affine"):
        """mlx-lm's ``quant_predicate`` for the default recipe: experts at ``expert_bits``;
        everything else at 8 bits."""

        def predicate(path: str, module: nn.Module):
            if not hasattr(module, "to_quantized"):
                return False
            if module.weight.shape[-1] % group_size:
                return False
            bits = expert_bits if ".experts." in path else 8
            return {"group_size": group_size, "bits": bits, "mode": mode}

        return predicate
