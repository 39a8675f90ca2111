#!/usr/bin/env python
"""Training speed: our block-diffusion training step against the same step in torch.

    python benchmarks/train_bench.py                  # one run, JSON into benchmarks/results/
    python benchmarks/train_bench.py --steps 3 --batch-size 2 --seq-length 64   # smoke test

Both sides train every weight (full fine-tuning, float32, AdamW) of the same random checkpoint
(built with transformers, ``tests/tiny.py``) on the same batch with the same random draws (block,
corrupted canvas, self-conditioning coins):

* ours: ``block_diffusion_loss`` (``dgemma_mlx.train``), ``nn.value_and_grad``, ``optim.AdamW``;
* torch: transformers' ``DiffusionGemmaForBlockDiffusion`` with TRL's batched formulation of the
  loss (``tests/train_reference.py``: the compute_loss of TRL's ``sft_diffusion_gemma.py``),
  ``loss.backward()``, ``torch.optim.AdamW``.

Sequences fit the sliding window, where the two formulations compute the same loss (the first
step's losses are reported side by side as a check). Tokens/s = real (unpadded) tokens per step /
the median step time, after ``--warmup`` untimed steps. On Linux, OpenBLAS is preloaded for MLX as
``bench.py`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

SPEC = dict(  # tiny but not trivial: ~6 M parameters, every kind of layer of the real model
    hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=6,
    num_attention_heads=4, num_key_value_heads=2, head_dim=64, global_head_dim=128,
    num_global_key_value_heads=1, sliding_window=256, num_experts=8, top_k_experts=2, canvas_length=32,
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=192, help="Longest row; rows are 50-100%% of it (padded batch).")
    p.add_argument("--steps", type=int, default=5, help="Timed steps per side.")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument("--no-preload", action="store_true", help="Do not preload OpenBLAS for MLX on Linux.")
    p.add_argument("--out", type=Path, default=HERE / "results" / "train.json")
    return p.parse_args(argv)


def maybe_preload(args) -> None:
    """Re-run this script with OpenBLAS preloaded on Linux (the benchmarks' shared helper)."""
    from probe import maybe_reexec_with_openblas

    maybe_reexec_with_openblas(args, lambda msg: print(msg, file=sys.stderr), script=__file__)


def make_batch(args, vocab: int, canvas: int):
    import numpy as np
    import train_reference as R

    rng = np.random.default_rng(0)
    lengths = rng.integers(args.seq_length // 2, args.seq_length + 1, args.batch_size)
    lengths[0] = args.seq_length
    prompts = [int(n) // 4 for n in lengths]
    ids, am, rm = R.batch(rng, lengths, prompts, vocab)
    blocks = np.maximum(rm.sum(1) - 1, 0) // canvas + 1
    block = (rng.random(args.batch_size) * blocks).astype(np.int64)
    target, _ = R.clean_canvas(ids, rm, block, canvas, 1)
    t = rng.uniform(1e-3, 1, (args.batch_size, 1))
    canvas_ids = np.where(rng.random(target.shape) < t, rng.integers(0, vocab, target.shape), target)
    sc = rng.random(args.batch_size) < 0.5
    return ids, am, rm, block, canvas_ids, sc


def time_steps(step, n: int, warmup: int):
    first = None
    for _ in range(warmup):
        out = step()
        first = out if first is None else first
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return first, times


def run_ours(path, batch, args):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim

    from dgemma_mlx import load
    from dgemma_mlx.train import block_diffusion_loss

    model, _ = load(path)
    model.unfreeze()
    model.train()
    ids, am, rm, block, canvas, sc = batch
    inputs = [mx.array(ids, dtype=mx.int32), mx.array(am), mx.array(rm), mx.array(block, dtype=mx.int32),
              mx.array(canvas, dtype=mx.int32), mx.array(sc)]
    opt = optim.AdamW(learning_rate=1e-5)
    loss_and_grad = nn.value_and_grad(model, lambda *a: block_diffusion_loss(model, *a, eos_id=1)[0])

    def step():
        loss, grads = loss_and_grad(*inputs)
        opt.update(model, grads)
        mx.eval(loss, model.parameters(), opt.state)
        return float(loss)

    mx.reset_peak_memory()
    first, times = time_steps(step, args.steps, args.warmup)
    return first, times, mx.get_peak_memory() / 1e9


def run_torch(ref, batch, args):
    import torch
    import train_reference as R

    torch.set_num_threads(args.torch_threads)
    ref.train()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-5)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = R.trl_loss(ref, *batch, eos=1)[0]
        loss.backward()
        opt.step()
        return loss.item()

    return time_steps(step, args.steps, args.warmup)


def main(argv=None) -> int:
    args = parse_args(argv)
    maybe_preload(args)
    import tiny
    from bench import machine_info

    spec = tiny.TinySpec(**SPEC)
    with tempfile.TemporaryDirectory() as tmp:
        ref, path = tiny.build_reference(Path(tmp) / "ckpt", spec=spec, seed=0)
        params = sum(p.numel() for p in ref.parameters())
        batch = make_batch(args, spec.vocab_size, spec.canvas_length)
        tokens = int(batch[1].sum())
        print(f"checkpoint: {params / 1e6:.1f} M parameters; batch {args.batch_size} x <= {args.seq_length} "
              f"({tokens} tokens), canvas {spec.canvas_length}", flush=True)
        ours_first, ours_times, ours_peak = run_ours(path, batch, args)
        print(f"ours:  median step {statistics.median(ours_times):.3f} s", flush=True)
        torch_first, torch_times = run_torch(ref, batch, args)
        print(f"torch: median step {statistics.median(torch_times):.3f} s", flush=True)
    ours_tps = tokens / statistics.median(ours_times)
    torch_tps = tokens / statistics.median(torch_times)
    report = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info(argparse.Namespace()),
        "spec": SPEC, "parameters": params, "vocab_size": spec.vocab_size,
        "batch_size": args.batch_size, "seq_length": args.seq_length, "tokens_per_step": tokens,
        "steps": args.steps, "warmup": args.warmup, "torch_threads": args.torch_threads,
        "first_loss": {"ours": ours_first, "torch": torch_first},
        "step_seconds": {"ours": ours_times, "torch": torch_times},
        "tokens_per_second": {"ours": ours_tps, "torch": torch_tps},
        "ours_over_torch": ours_tps / torch_tps,
        "ours_peak_memory_gb": ours_peak,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2))
    tmp_out.replace(args.out)
    print(f"tokens/s: ours {ours_tps:.0f}, torch {torch_tps:.0f} ({ours_tps / torch_tps:.2f}x); "
          f"first loss ours {ours_first:.5f}, torch {torch_first:.5f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
