"""Roofline of a denoising pass of the released DiffusionGemma (26B-A4B) quantized as ``dgemma convert``
writes it (experts at 4 bits, everything else at 8, groups of 64, affine), on a machine with a given
memory bandwidth and matmul rate.

A pass reads every weight the canvas routes to (256 tokens x top-8 of 128 experts touch nearly all
experts) and the cached prefix, and does ~2.9 TFLOP of matmuls; the time is at least the larger of
bytes / bandwidth and FLOPs / rate. Passes per block set tokens per second:
``tok/s = C / (passes x t_pass + t_commit)`` with the committed block's encode ``t_commit``.

    python benchmarks/roofline.py                         # the chips in CHIPS, JSON on stdout
    python benchmarks/roofline.py --bandwidth 273 --tflops 9 --passes 16 --prefix 2048

The chip figures are estimates (Apple's published memory bandwidth; GPU fp16 matmul rates
estimated from core counts and clocks), not measurements: pass your own with --bandwidth/--tflops.
"""

from __future__ import annotations

import argparse
import json

from flops import prefill_flops, step_flops

# The released text stack (../shared/DESIGN.md): 30 layers, 5 sliding : 1 full.
LAYERS = 30
REAL = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, moe_intermediate_size=704,
    num_hidden_layers=LAYERS, num_attention_heads=16, num_experts=128, top_k_experts=8,
    sliding_window=1024, canvas_length=256,
    layer_types=["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(LAYERS)],
    layer_head_dims=[512 if i % 6 == 5 else 256 for i in range(LAYERS)],
    layer_kv_heads=[2 if i % 6 == 5 else 8 for i in range(LAYERS)],
)

# (memory bandwidth GB/s, estimated GPU fp16 matmul TFLOP/s)
CHIPS = {
    "M4 (10-core GPU)": (120, 4.3),
    "M4 Pro (20-core GPU)": (273, 8.6),
    "M4 Max (40-core GPU)": (546, 17.2),
    "M3 Ultra (80-core GPU)": (819, 28.0),
}


def bits_per_weight(bits: int, group_size: int = 64) -> float:
    """Affine quantization: ``bits`` per weight plus a 16-bit scale and bias per group."""
    return bits + 32 / group_size


def experts_touched(tokens: int, experts: int, top_k: int) -> float:
    """Expected distinct experts a layer runs for ``tokens`` tokens under uniform routing."""
    return experts * (1 - (1 - top_k / experts) ** tokens)


def weight_bytes_per_pass(s: dict, tokens: int, expert_bits: int = 4, other_bits: int = 8) -> dict:
    """Bytes of weights one pass over ``tokens`` canvas positions reads, by part."""
    H, nq = s["hidden_size"], s["num_attention_heads"]
    attn = mlp = experts = 0.0
    touched = experts_touched(tokens, s["num_experts"], s["top_k_experts"])
    for i in range(s["num_hidden_layers"]):
        D, kv = s["layer_head_dims"][i], s["layer_kv_heads"][i]
        sliding = s["layer_types"][i] == "sliding_attention"
        attn += H * (nq * D + kv * D + (kv * D if sliding else 0) + nq * D)
        mlp += 3 * H * s["intermediate_size"] + H * s["num_experts"]  # dense MLP + router
        experts += touched * 3 * H * s["moe_intermediate_size"]
    # The tied embedding is read twice a pass (self-conditioning soft embedding and the head).
    embed = 2 * s["vocab_size"] * H
    other = bits_per_weight(other_bits) / 8
    parts = {
        "attention": attn * other,
        "dense_mlp_router": mlp * other,
        "experts": experts * bits_per_weight(expert_bits) / 8,
        "embedding_x2": embed * other,
    }
    parts["total"] = sum(parts.values())
    return parts


def cache_bytes_per_pass(s: dict, prefix: int, dtype_bytes: int = 2) -> float:
    """Bytes of cached keys and values one pass reads after ``prefix`` tokens (bf16 cache)."""
    total = 0
    for i in range(s["num_hidden_layers"]):
        kept = min(prefix, s["sliding_window"] - 1) if s["layer_types"][i] == "sliding_attention" else prefix
        total += 2 * kept * s["layer_kv_heads"][i] * s["layer_head_dims"][i] * dtype_bytes
    return total


def predict(bandwidth_gbs: float, tflops: float, passes: int, prefix: int, s: dict = REAL) -> dict:
    C = s["canvas_length"]
    w = weight_bytes_per_pass(s, C)
    cache = cache_bytes_per_pass(s, prefix)
    flops = step_flops(s, prefix)["total"]
    t_mem = (w["total"] + cache) / (bandwidth_gbs * 1e9)
    t_compute = flops / (tflops * 1e12)
    t_pass = max(t_mem, t_compute)
    commit_flops = prefill_flops(s, C, prefix)
    t_commit = max(commit_flops / (tflops * 1e12), w["total"] / 2 / (bandwidth_gbs * 1e9))
    return {
        "bandwidth_gbs": bandwidth_gbs, "tflops": tflops, "passes_per_block": passes, "prefix": prefix,
        "weight_gb_per_pass": w["total"] / 1e9, "cache_gb_per_pass": cache / 1e9,
        "tflop_per_pass": flops / 1e12, "ms_pass_memory_bound": t_mem * 1e3,
        "ms_pass_compute_bound": t_compute * 1e3, "bound": "compute" if t_compute > t_mem else "memory",
        "passes_per_s": 1 / t_pass, "ms_commit": t_commit * 1e3,
        "tokens_per_s": C / (passes * t_pass + t_commit),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bandwidth", type=float, help="memory bandwidth, GB/s")
    p.add_argument("--tflops", type=float, help="matmul rate, TFLOP/s")
    p.add_argument("--passes", type=int, nargs="+", default=[8, 16, 48], help="passes per block")
    p.add_argument("--prefix", type=int, default=1024, help="cached tokens before the canvas")
    a = p.parse_args()
    chips = {"given": (a.bandwidth, a.tflops)} if a.bandwidth and a.tflops else CHIPS
    out = {
        "weights_by_part_gb": {k: v / 1e9 for k, v in weight_bytes_per_pass(REAL, REAL["canvas_length"]).items()},
        "flops_by_part_tflop": {k: v / 1e12 for k, v in step_flops(REAL, a.prefix).items()},
        "experts_touched_per_layer": experts_touched(REAL["canvas_length"], REAL["num_experts"], REAL["top_k_experts"]),
        "chips": {name: [predict(bw, tf, n, a.prefix) for n in a.passes] for name, (bw, tf) in chips.items()},
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
