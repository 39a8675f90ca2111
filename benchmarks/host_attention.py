#!/usr/bin/env python
"""The CPU attention's softmax on the host against MLX's ops, side by side in one run.

    python benchmarks/host_attention.py                       # both shapes, prefixes 256 and 4096, ~3 min quiet
    python benchmarks/host_attention.py --shapes hidden --prefixes 4096 --repeats 5

Inside host math (every inference pass and, with the CPU kernels, encoding) the attention's softmax
across the prefix and the canvas is one in-place host pass over every head's scores
(``dgemma_mlx.ops.host_exp2_rows``: row maximum, shift, exp2 written over the score buffers). The
alternative (``dgemma_mlx.attention.HOST_SOFTMAX = False``) is MLX's maximum, shift and exp2 over
new buffers, kv-head groups on two streams, the exponentials still NumPy's. Both give the same
values bit for bit (tests/test_fast_math.py).

Each shape is a random float32 model with the sweep's attention shapes (``benchmarks/sweep.py``)
and 2 layers, one sliding (window 1024) and one full, vocabulary 32768:

* ``base``: hidden 1024, 8 query heads of 128 / 256 (sliding / full), 4 / 2 kv heads;
* ``hidden``: hidden 2816, 16 query heads of 256 / 512, 8 / 2 kv heads (the released model's).

Per prefix the two configurations alternate (a warm-up round first, then ``--repeats``, median):

* ``attention_ms``: the attention of every layer over the cache and a 256-token canvas, as a
  denoising pass runs it;
* ``step_ms``: a whole denoising pass with self-conditioning (``Model.denoise`` under host math);
* ``encode_s``: encoding the prefix (``Model.encode``, chunks of 512).

Then the sampler (``--sampler-std``): its per-position host pass over [256, 32768] logits of
each standard deviation (clipped at the soft cap, ±30) at temperature 0.4, with the host
exponentials as they are (``ops.host_exp2_block``: 0 below 2**-126) and as plain ``np.exp2``
(subnormal results included), alternating, median of 5. Wide logits put many results under
2**-126, where NumPy's exp2 leaves its fast path.

JSON in ``benchmarks/results/host-attention-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import names_from  # noqa: E402  (modules of benchmarks/)
from fast_sampling import random_config  # noqa: E402
from probe import loadavg, machine_info, maybe_reexec_with_openblas  # noqa: E402

COMMON = dict(vocab_size=32768, num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"],
              sliding_window=1024, num_experts=32, top_k_experts=4, moe_intermediate_size=512,
              max_position_embeddings=65536)
SHAPES = {
    "base": random_config(**COMMON, hidden_size=1024, intermediate_size=768, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=128, num_global_key_value_heads=2, global_head_dim=256),
    "hidden": random_config(**COMMON, hidden_size=2816, intermediate_size=2112, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=256, num_global_key_value_heads=2, global_head_dim=512),
}
CONFIGS = {"host": True, "mlx": False}


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(shape: str, prefixes: list[int], repeats: int, seed: int) -> dict:
    import mlx.core as mx

    from dgemma_mlx import attention, ops
    from dgemma_mlx.config import ModelArgs
    from dgemma_mlx.model import Model

    args = ModelArgs.from_config(SHAPES[shape])
    mx.random.seed(seed)
    model = Model(args)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    C, V = args.canvas_length, args.vocab_size
    canvas = mx.random.randint(3, V, (1, C), key=mx.random.key(seed + 1))
    sc = mx.random.normal((1, C, V), key=mx.random.key(seed + 2)) * 4.0
    x = mx.random.normal((1, C, args.hidden_size), key=mx.random.key(seed + 3))
    mx.eval(canvas, sc, x)
    out = {"shape": shape, "hidden": args.hidden_size, "layers": args.num_hidden_layers, "prefixes": {}}
    for prefix in prefixes:
        ids = mx.random.randint(3, V, (1, prefix), key=mx.random.key(seed + prefix))
        runs = {name: {"attention_ms": [], "step_ms": [], "encode_s": []} for name in CONFIGS}
        try:
            for repeat in range(1 + repeats):  # configurations alternate; the first round warms up
                for name, host in CONFIGS.items():
                    attention.HOST_SOFTMAX = host
                    cache = model.make_cache()
                    encode_s = timed(lambda: model.encode(ids, cache))

                    def attend_all():
                        mx.eval([layer.self_attn.denoise(x, c, cache.offset) for layer, c in zip(model.layers, cache.layers)])

                    def step():
                        mx.eval(model.denoise(canvas, cache, sc))

                    with ops.host_math():
                        attention_ms, step_ms = 1000 * timed(attend_all), 1000 * timed(step)
                    if repeat:
                        r = runs[name]
                        r["attention_ms"].append(attention_ms)
                        r["step_ms"].append(step_ms)
                        r["encode_s"].append(encode_s)
                    print(f"{shape} prefix {prefix} {name} round {repeat}: attention {attention_ms:.1f} ms, "
                          f"step {step_ms:.1f} ms, encode {encode_s:.2f} s", file=sys.stderr, flush=True)
        finally:
            attention.HOST_SOFTMAX = True
        row = {name: {**{k: statistics.median(v) for k, v in r.items()}, "runs": r} for name, r in runs.items()}
        row["host_vs_mlx"] = {k: row["host"][k] / row["mlx"][k] for k in ("attention_ms", "step_ms", "encode_s")}
        out["prefixes"][str(prefix)] = row
    return out


def measure_sampler(stds: list[float], seed: int) -> list[dict]:
    import mlx.core as mx
    import numpy as np

    from dgemma_mlx import ops, sampler

    rows = []
    t, u = mx.array(0.4, mx.float32), sampler._uniforms((256,), mx.random.key(seed))
    plain = lambda xs, out: np.exp2(xs, out=out)  # noqa: E731
    for std in stds:
        logits = mx.clip(mx.random.normal((256, 32768), key=mx.random.key(seed + 1)) * std, -30.0, 30.0)
        mx.eval(logits)

        def run():
            with ops.host_math():
                mx.eval(*sampler._per_position(logits, t, u))

        runs = {"host_exp2_block": [], "np.exp2": []}
        for repeat in range(6):  # alternating; the first round warms up
            for name, fn in (("host_exp2_block", ops.host_exp2_block), ("np.exp2", plain)):
                real = sampler.host_exp2_block
                sampler.host_exp2_block = fn
                try:
                    ms = 1000 * timed(run)
                finally:
                    sampler.host_exp2_block = real
                if repeat:
                    runs[name].append(ms)
        row = {"logit_std": std, **{name: statistics.median(v) for name, v in runs.items()}, "runs": runs}
        row["ratio"] = row["host_exp2_block"] / row["np.exp2"]
        print(f"sampler, logit std {std}: {row['host_exp2_block']:.1f} ms against {row['np.exp2']:.1f} ms",
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--prefixes", default="256,4096", help="cached prefix lengths (comma-separated)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--sampler-std", default="1,3,8", help="logit standard deviations for the sampler timing ('' skips it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-preload", action="store_true", help="do not re-run with OpenBLAS preloaded (Linux)")
    a = p.parse_args()
    shapes = names_from(a.shapes, SHAPES, "shape")
    try:
        prefixes = [int(v) for v in a.prefixes.split(",") if v.strip()]
        stds = [float(v) for v in a.sampler_std.split(",") if v.strip()]
    except ValueError:
        sys.exit("error: --prefixes takes comma-separated integers and --sampler-std numbers")
    if not prefixes or min(prefixes) < 1 or a.repeats < 1:
        sys.exit("error: --prefixes must be positive and --repeats at least 1")
    maybe_reexec_with_openblas(a, lambda message: print(message, file=sys.stderr))
    result = {"benchmark": "host_attention", "time": datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(a), "load_before": loadavg(),
              "shapes": [measure(s, prefixes, a.repeats, a.seed) for s in shapes],
              "sampler": measure_sampler(stds, a.seed), "load_after": loadavg()}
    out = a.out or HERE / "results" / f"host-attention-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'shape':7} {'prefix':>6} {'attention host / mlx (ms)':>27} {'step host / mlx (ms)':>23} "
          f"{'encode host / mlx (s)':>23}")
    for s in result["shapes"]:
        for prefix, row in s["prefixes"].items():
            h, m, r = row["host"], row["mlx"], row["host_vs_mlx"]
            print(f"{s['shape']:7} {prefix:>6} {h['attention_ms']:8.1f} / {m['attention_ms']:6.1f} ({r['attention_ms']:.2f}x) "
                  f"{h['step_ms']:6.0f} / {m['step_ms']:5.0f} ({r['step_ms']:.2f}x) "
                  f"{h['encode_s']:6.2f} / {m['encode_s']:5.2f} ({r['encode_s']:.2f}x)")
    for r in result["sampler"]:
        print(f"sampler per-position pass [256, 32768], T 0.4, logit std {r['logit_std']:g}: "
              f"{r['host_exp2_block']:.1f} ms against plain np.exp2 {r['np.exp2']:.1f} ms ({r['ratio']:.2f}x)")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
