#!/usr/bin/env python
"""The GPU path's compiled pass, timed on the CPU backend (a proxy: there is no GPU here).

    python benchmarks/compiled_pass.py                 # both shapes, ~3 min quiet
    python benchmarks/compiled_pass.py --shapes depth --passes 8

With the fused kernels (the path Metal runs) a block's passes after the first replay one compiled
graph (``dgemma_mlx/compiled_pass.py``) instead of building the graph in Python every pass. Each
shape is a random float32 model; each configuration runs the same block (stop rule off, so every
pass runs), alternating, warm-up first, median of ``--repeats``:

* ``cpu``: the CPU kernels (what runs here by default), for scale;
* ``fused``: the fused kernels, eager (every pass built in Python);
* ``fused+compiled``: the fused kernels with the compiled passes (the default on a GPU).

Shapes:

* ``depth``: the released model's 30 layers (5 sliding : 1 full) with tiny widths and vocabulary, so
  a pass's time is mostly the host's: building the graph op by op, which the GPU waits for once per
  pass (the sampler's stop flags are read every pass). The compiled pass's saving here is what it
  saves per pass on a GPU, before any fusion.
* ``vocab``: the sweep's vocabulary shape (6 layers, 262144 tokens), where the vocabulary-sized
  elementwise work (soft cap, softmax, entropy, draws) that compilation fuses is large.

The first compiled pass of a block (its second pass) traces the graph: ``trace_ms`` is that pass's
time minus the eager fused path's second pass. JSON in ``benchmarks/results/compiled-pass-<time>.json``.
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
from fast_sampling import SPEED_SHAPE, random_config, random_model  # noqa: E402
from probe import loadavg, machine_info, maybe_reexec_with_openblas  # noqa: E402

SHAPES = {
    "depth": random_config(
        vocab_size=4096, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=30, num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, sliding_window=128, num_experts=16, top_k_experts=4,
    ),
    "vocab": SPEED_SHAPE,
}
CONFIGS = {"cpu": ("cpu", False), "fused": ("fused", False), "fused+compiled": ("fused", True)}


def time_block(model, cache, settings, pins, seed: int) -> list[float]:
    """Seconds of each pass of one block."""
    import mlx.core as mx

    from dgemma_mlx.refine import initial_canvas, refine_block

    C, V = model.args.canvas_length, model.args.vocab_size
    canvas = initial_canvas((1, C), V, mx.random.key(seed), pinned=pins)
    times, start = [], time.perf_counter()
    for _ in refine_block(model, cache, canvas, settings=settings, key=mx.random.key(seed + 1), pinned=pins):
        now = time.perf_counter()
        times.append(now - start)
        start = now
    return times


def measure(shape: str, passes: int, repeats: int, prompt: int, seed: int) -> dict:
    from dgemma_mlx import ops
    from dgemma_mlx.settings import GenerationSettings

    model, cache = random_model(SHAPES[shape], prompt, seed)
    args = model.args
    settings = GenerationSettings(steps=passes, stability_threshold=0, confidence_threshold=1e-30)
    runs: dict[str, list[list[float]]] = {name: [] for name in CONFIGS}
    try:
        for repeat in range(1 + repeats):  # configurations alternate; the first round warms up
            for name, (kernels, compiled) in CONFIGS.items():
                ops.set_kernels(kernels)
                ops.set_compiled_passes(compiled)
                runs[name].append(time_block(model, cache, settings, None, seed + repeat))
                print(f"{shape} {name} run {repeat}: {1000 * sum(runs[name][-1]):.0f} ms", file=sys.stderr, flush=True)
    finally:
        ops.set_kernels("auto")
        ops.set_compiled_passes(True)
    out = {"shape": shape, "layers": args.num_hidden_layers, "vocab": args.vocab_size,
           "hidden": args.hidden_size, "prompt": prompt, "passes": passes, "configs": {}}
    for name, timed in runs.items():
        timed = timed[1:]
        # Passes 2.. are the ones the compiled graph serves; pass 2 of a compiled block also traces.
        later = [statistics.median(t[2:]) for t in timed]
        out["configs"][name] = {
            "ms_first_pass": 1000 * statistics.median(t[0] for t in timed),
            "ms_per_later_pass": 1000 * statistics.median(later),
            "ms_per_later_pass_runs": [1000 * x for x in later],
            "ms_second_pass": 1000 * statistics.median(t[1] for t in timed),
        }
    eager, comp = out["configs"]["fused"], out["configs"]["fused+compiled"]
    out["compiled_vs_eager"] = comp["ms_per_later_pass"] / eager["ms_per_later_pass"]
    # The second pass is the first with self-conditioning; with the compiled passes it also traces.
    out["trace_ms"] = comp["ms_second_pass"] - eager["ms_second_pass"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, from {', '.join(SHAPES)}")
    p.add_argument("--passes", type=int, default=8, help="passes per block (at least 4)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-preload", action="store_true", help="do not re-run with OpenBLAS preloaded (Linux)")
    a = p.parse_args()
    shapes = names_from(a.shapes, SHAPES, "shape")
    if a.passes < 4 or a.repeats < 1:
        sys.exit("error: --passes must be at least 4 and --repeats at least 1")
    maybe_reexec_with_openblas(a, lambda message: print(message, file=sys.stderr))
    result = {"benchmark": "compiled_pass", "time": datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(a),
              "shapes": [measure(s, a.passes, a.repeats, a.prompt, a.seed) for s in shapes],
              "load_after": loadavg()}
    out = a.out or HERE / "results" / f"compiled-pass-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'shape':8} {'config':16} {'first pass':>11} {'later pass':>11}")
    for s in result["shapes"]:
        for name, c in s["configs"].items():
            print(f"{s['shape']:8} {name:16} {c['ms_first_pass']:9.1f}ms {c['ms_per_later_pass']:9.1f}ms")
        print(f"{s['shape']:8} compiled / eager (fused, later passes): {s['compiled_vs_eager']:.2f}x; "
              f"trace {s['trace_ms']:.0f} ms once per block")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
