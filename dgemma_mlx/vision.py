"""DiffusionGemma's vision tower (transformers' ``gemma4_vision``) and its projection into the text
model, in MLX.

An image arrives as patches from :mod:`dgemma_mlx.image_processing`: ``pixel_values``
[P, 3 * patch**2] in [0, 1] and ``position_ids`` [P, 2] holding each patch's (x, y) on the patch
grid, (-1, -1) for padding. The tower:

* embeds each patch: ``input_proj(2 * (pixels - 0.5))`` plus a learned position embedding
  ``table[0][x] + table[1][y]``;
* runs ``num_hidden_layers`` bidirectional transformer layers (RMS-normed q/k/v, attention scale
  1.0, 2-D RoPE: the first half of each head rotates with x, the second half with y; gated GELU
  MLP; pre/post norms around both sublayers);
* average-pools each ``k x k`` block of patches (``k = pooling_kernel_size``) into one soft token,
  in row-major order over the pooled grid, and scales by ``sqrt(hidden_size)`` in float32
  (optionally standardised with ``std_bias`` / ``std_scale``).

:class:`MultimodalEmbedder` (``embed_vision``) then maps the soft tokens into the text model's
hidden size: a scale-free RMS norm and a linear projection. Padding patches are dropped before the
tower runs: in the reference they are masked out of attention and zeroed before pooling, so they
never change a real patch's output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import DGemmaError
from .ops import gelu_mul

VISION_MODEL_TYPE = "gemma4_vision"


@dataclass
class VisionArgs:
    """The vision tower's shapes, from ``config.json``'s ``vision_config`` (reference defaults)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 16
    num_attention_heads: int = 12
    num_key_value_heads: int = 12
    head_dim: int = 64
    rms_norm_eps: float = 1e-6
    rope_theta: float = 100.0
    pooling_kernel_size: int = 3
    patch_size: int = 16
    position_embedding_size: int = 10 * 1024
    use_clipped_linears: bool = False
    standardize: bool = False

    @classmethod
    def from_config(cls, config: Any) -> "VisionArgs":
        if not isinstance(config, dict):
            raise DGemmaError("config.json: vision_config is not a JSON object")
        model_type = config.get("model_type", VISION_MODEL_TYPE)
        if model_type != VISION_MODEL_TYPE:
            raise DGemmaError(f"config.json: vision_config is a '{model_type}', not '{VISION_MODEL_TYPE}'")
        values: dict[str, Any] = {}
        for name, f in cls.__dataclass_fields__.items():
            if name == "rope_theta" or config.get(name) is None:
                continue
            kind = type(f.default)
            try:
                values[name] = kind(config[name])
            except (TypeError, ValueError):
                raise DGemmaError(f"config.json vision_config '{name}' is not a {kind.__name__}: {config[name]!r}")
        rope = config.get("rope_parameters") or {}
        if isinstance(rope, dict) and rope.get("rope_theta") is not None:
            values["rope_theta"] = float(rope["rope_theta"])
        args = cls(**values)
        if args.num_key_value_heads <= 0 or args.num_attention_heads % args.num_key_value_heads:
            raise DGemmaError("config.json vision_config: attention heads must be a multiple of key/value heads")
        if args.head_dim % 4:
            raise DGemmaError("config.json vision_config: head_dim must be a multiple of 4 (2-D RoPE)")
        return args


class ClippableLinear(nn.Module):
    """A bias-free linear layer (weights under ``.linear``) whose input and output are optionally
    clamped to ranges stored in the checkpoint (``use_clipped_linears``)."""

    def __init__(self, dims_in: int, dims_out: int, clipped: bool):
        super().__init__()
        self.linear = nn.Linear(dims_in, dims_out, bias=False)
        self.clipped = clipped
        if clipped:
            self.input_min = mx.array(-math.inf)
            self.input_max = mx.array(math.inf)
            self.output_min = mx.array(-math.inf)
            self.output_max = mx.array(math.inf)

    def __call__(self, x: mx.array) -> mx.array:
        if not self.clipped:
            return self.linear(x)
        x = mx.clip(x, self.input_min, self.input_max)
        return mx.clip(self.linear(x), self.output_min, self.output_max)


def rope_2d(x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
    """Axial RoPE: ``x`` [L, heads, D]; ``cos``/``sin`` [L, 1, D] laid out as
    ``[c_x, c_x, c_y, c_y]`` (quarters of D). Each half of D is rotated on its own (rotate-half)."""
    D = x.shape[-1]
    q = D // 4
    parts = []
    for a in (0, 2 * q):
        h = x[..., a : a + 2 * q]
        rotated = mx.concatenate([-h[..., q:], h[..., :q]], axis=-1)
        parts.append(h * cos[..., a : a + 2 * q] + rotated * sin[..., a : a + 2 * q])
    return mx.concatenate(parts, axis=-1)


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        H, hd, clip = args.hidden_size, args.head_dim, args.use_clipped_linears
        self.n_heads, self.n_kv, self.head_dim = args.num_attention_heads, args.num_key_value_heads, hd
        self.eps = args.rms_norm_eps
        self.q_proj = ClippableLinear(H, self.n_heads * hd, clip)
        self.k_proj = ClippableLinear(H, self.n_kv * hd, clip)
        self.v_proj = ClippableLinear(H, self.n_kv * hd, clip)
        self.o_proj = ClippableLinear(self.n_heads * hd, H, clip)
        self.q_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)
        self.k_norm = nn.RMSNorm(hd, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """``x`` [L, H] (one image's patches) -> [L, H]; every patch attends to every patch."""
        L = x.shape[0]
        q = rope_2d(self.q_norm(self.q_proj(x).reshape(L, self.n_heads, -1)), cos, sin)
        k = rope_2d(self.k_norm(self.k_proj(x).reshape(L, self.n_kv, -1)), cos, sin)
        v = mx.fast.rms_norm(self.v_proj(x).reshape(L, self.n_kv, -1), None, self.eps)
        q, k, v = (t.transpose(1, 0, 2)[None] for t in (q, k, v))
        o = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0)
        return self.o_proj(o[0].transpose(1, 0, 2).reshape(L, -1))


class VisionMLP(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        H, I, clip = args.hidden_size, args.intermediate_size, args.use_clipped_linears
        self.gate_proj = ClippableLinear(H, I, clip)
        self.up_proj = ClippableLinear(H, I, clip)
        self.down_proj = ClippableLinear(I, H, clip)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(gelu_mul(self.gate_proj(x), self.up_proj(x)))


class VisionLayer(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        H, eps = args.hidden_size, args.rms_norm_eps
        self.self_attn = VisionAttention(args)
        self.mlp = VisionMLP(args)
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(H, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(H, eps=eps)

    def __call__(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = [VisionLayer(args) for _ in range(args.num_hidden_layers)]


class PatchEmbedder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.input_proj = nn.Linear(3 * args.patch_size**2, args.hidden_size, bias=False)
        self.position_embedding_table = mx.ones((2, args.position_embedding_size, args.hidden_size))

    def __call__(self, pixels: mx.array, positions: mx.array) -> mx.array:
        """``pixels`` [L, 3 * patch**2] in [0, 1], ``positions`` int [L, 2] (x, y) -> [L, H]."""
        table = self.position_embedding_table  # float even when input_proj is quantized
        h = self.input_proj((2 * (pixels - 0.5)).astype(table.dtype))
        return h + (table[0][positions[:, 0]] + table[1][positions[:, 1]]).astype(h.dtype)


class VisionTower(nn.Module):
    """``vision_tower``: patches of one image -> its soft tokens (float32 before the final cast)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_embedder = PatchEmbedder(args)
        self.encoder = VisionEncoder(args)
        if args.standardize:
            self.std_bias = mx.zeros((args.hidden_size,))
            self.std_scale = mx.ones((args.hidden_size,))
        spatial = args.head_dim // 2
        self._inv_freq = 1.0 / (args.rope_theta ** (mx.arange(0, spatial, 2, dtype=mx.float32) / spatial))

    def _rope(self, positions: mx.array, dtype: mx.Dtype) -> tuple[mx.array, mx.array]:
        freqs = positions[..., None].astype(mx.float32) * self._inv_freq  # [L, 2, D/4]
        cos, sin = mx.cos(freqs), mx.sin(freqs)

        def layout(f: mx.array) -> mx.array:  # [c_x, c_x, c_y, c_y], one head axis
            return mx.concatenate([f[:, 0], f[:, 0], f[:, 1], f[:, 1]], axis=-1)[:, None].astype(dtype)

        return layout(cos), layout(sin)

    def __call__(self, pixel_values: mx.array, position_ids: mx.array) -> mx.array:
        """``pixel_values`` [P, 3 * patch**2], ``position_ids`` int [P, 2] with (-1, -1) rows for
        padding (as produced by the image processor; padding rows may be absent) -> soft tokens
        [N, H] with ``N`` = real patches / k**2, row-major over the pooled grid."""
        pos = np.asarray(position_ids)
        valid = ~(pos == -1).all(axis=-1)
        pos = pos[valid]
        k = self.args.pooling_kernel_size
        if not len(pos):
            raise DGemmaError("the image has no patches")
        width, height = int(pos[:, 0].max()) + 1, int(pos[:, 1].max()) + 1
        if width % k or height % k or width * height != len(pos):
            raise DGemmaError(f"image patches do not form a grid divisible by the pooling kernel ({k})")
        order = np.argsort(pos[:, 1] * width + pos[:, 0], kind="stable")  # row-major patch order
        rows = np.flatnonzero(valid)[order]
        pixels = mx.array(np.asarray(pixel_values)[rows])
        positions = mx.array(pos[order].astype(np.int32))

        h = self.patch_embedder(pixels, positions)
        cos, sin = self._rope(positions, h.dtype)
        for layer in self.encoder.layers:
            h = layer(h, cos, sin)
        H = h.shape[-1]
        pooled = h.astype(mx.float32).reshape(height // k, k, width // k, k, H).sum(axis=(1, 3)) / (k * k)
        out = pooled.reshape(-1, H) * math.sqrt(self.args.hidden_size)
        if self.args.standardize:
            out = (out - self.std_bias.astype(mx.float32)) * self.std_scale.astype(mx.float32)
        return out.astype(h.dtype)


class MultimodalEmbedder(nn.Module):
    """``embed_vision``: soft tokens [N, Hv] -> text embeddings [N, H] (scale-free RMS norm, linear)."""

    def __init__(self, vision_hidden: int, text_hidden: int, eps: float):
        super().__init__()
        self.eps = eps
        self.embedding_projection = nn.Linear(vision_hidden, text_hidden, bias=False)

    def __call__(self, soft_tokens: mx.array) -> mx.array:
        return self.embedding_projection(mx.fast.rms_norm(soft_tokens, None, self.eps))


def sanitize_vision_key(key: str) -> Optional[str]:
    """The module path of a vision weight in any supported checkpoint layout (transformers:
    ``model.encoder.vision_tower.*``; mlx-vlm: the same names; ours: ``vision_tower.*``), or None
    for a key that is not a vision weight."""
    for root in ("vision_tower.", "embed_vision."):
        i = key.find(root)
        if i == 0 or (i > 0 and key[i - 1] == "."):
            return key[i:]
    return None
