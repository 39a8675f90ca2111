"""Analytic FLOP counts of a denoising step and of encoding, from the model's shapes
(:class:`dgemma_mlx.config.ModelArgs`, so every config form is read the way the model reads it)."""

from __future__ import annotations

import json
from pathlib import Path

from dgemma_mlx.config import ModelArgs


def read_shape(checkpoint: Path) -> dict:
    """The shapes FLOP counting needs (stored in the report), read by :class:`ModelArgs` from the
    checkpoint's config.json, exactly as the model reads it."""
    return shape_from_config(json.loads((checkpoint / "config.json").read_text()))


def shape_from_config(config: dict) -> dict:
    """:func:`read_shape` of a parsed config.json (e.g. one not written yet)."""
    args = ModelArgs.from_config(config)
    names = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_experts", "top_k_experts", "sliding_window", "canvas_length")
    shape = {name: int(getattr(args, name)) for name in names}
    shape.update(layer_types=list(args.layer_types), layer_head_dims=list(args.layer_head_dims),
                 layer_kv_heads=list(args.layer_kv_heads))
    return shape


def _layer_dense_flops(s: dict, i: int, tokens: int) -> dict:
    """Matmul FLOPs of layer i on ``tokens`` tokens, attention scores excluded."""
    H, nq = s["hidden_size"], s["num_attention_heads"]
    D, kv = s["layer_head_dims"][i], s["layer_kv_heads"][i]
    sliding = s["layer_types"][i] == "sliding_attention"
    proj_out = nq * D + kv * D + (kv * D if sliding else 0)  # q, k, (v)
    return {
        "attn_proj": 2 * tokens * H * (proj_out + nq * D),  # + o_proj
        "dense_mlp": 2 * tokens * 3 * H * s["intermediate_size"],
        "experts": 2 * tokens * s["top_k_experts"] * 3 * H * s["moe_intermediate_size"],
        "router": 2 * tokens * H * s["num_experts"],
    }


def step_flops(s: dict, prefix: int) -> dict:
    """Analytic FLOPs of one denoising step (canvas C after ``prefix`` cached tokens), by part."""
    C, H, V, W = s["canvas_length"], s["hidden_size"], s["vocab_size"], s["sliding_window"]
    parts = {"attn_proj": 0, "attn_scores_values": 0, "dense_mlp": 0, "experts": 0, "router": 0}
    for i in range(s["num_hidden_layers"]):
        for k, v in _layer_dense_flops(s, i, C).items():
            parts[k] += v
        keys = (min(prefix, W - 1) if s["layer_types"][i] == "sliding_attention" else prefix) + C
        parts["attn_scores_values"] += 2 * 2 * s["num_attention_heads"] * C * s["layer_head_dims"][i] * keys
    parts["sc_soft_embedding"] = 2 * C * V * H
    parts["sc_mlp"] = 2 * C * 3 * H * s["intermediate_size"]
    parts["output_head"] = 2 * C * V * H
    parts["total"] = sum(parts.values())
    return parts


def prefill_flops(s: dict, length: int, start: int = 0) -> int:
    """Analytic FLOPs of encoding ``length`` tokens after ``start`` cached ones (causal)."""
    W = s["sliding_window"]
    total = 0
    for i in range(s["num_hidden_layers"]):
        total += sum(_layer_dense_flops(s, i, length).values())
        if s["layer_types"][i] == "sliding_attention":
            keys = sum(min(p + 1, W) for p in range(start, start + length))
        else:
            keys = sum(p + 1 for p in range(start, start + length))
        total += 2 * 2 * s["num_attention_heads"] * s["layer_head_dims"][i] * keys
    return total
