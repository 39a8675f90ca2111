#!/usr/bin/env python
"""The server's overhead: time to the last token through `dgemma serve` against a direct `generate`.

    python benchmarks/serve_overhead.py                      # 'mid' random checkpoint, ~5 min on 2 cores
    python benchmarks/serve_overhead.py --config tiny --max-tokens 256 --steps 4   # smoke test

The same chat request (same prompt, seed and settings, so the same tokens and passes) runs, in
alternation, as a direct :func:`dgemma_mlx.generate.generate` in this process and through a
`dgemma serve` subprocess on a loopback port, non-streamed and streamed (time to the last content
chunk). Everything is timed from the call: the direct run includes rendering the chat template, the
server runs include HTTP, JSON, tokenization, the queue and the worker thread. The report gives
the medians and ``server / direct`` (the target is <= 1.05). Results go to
``benchmarks/results/serve-overhead-<config>-<time>.json``. Other load on the machine skews both
sides; the JSON records the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from bench import machine_info, maybe_reexec_with_openblas, worker_env  # noqa: E402
from checkpoints import CONFIGS, ensure_checkpoint  # noqa: E402

QUESTION = "Why is the sky blue?"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default="mid", choices=CONFIGS, help="random checkpoint to build (or reuse)")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint directory instead")
    p.add_argument("--cache-dir", default="~/.cache/dgemma-bench", help="where built checkpoints are kept")
    p.add_argument("--max-tokens", type=int, default=512, help="tokens per request (two 256-token blocks)")
    p.add_argument("--steps", type=int, default=8, help="denoising passes per block")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each kind (median reported)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="results file")
    p.add_argument("--no-preload", action="store_true", help="do not re-run with OpenBLAS preloaded (Linux)")
    return p.parse_args(argv)


def start_server(checkpoint: Path) -> tuple[subprocess.Popen, str]:
    env = {**worker_env(), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "dgemma_mlx", "serve", "--model", str(checkpoint), "--port", "0"],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stderr:
        if line.startswith("Serving ") and " at " in line:
            return proc, line.rsplit(" at ", 1)[1].strip()
    raise RuntimeError("the server did not start")


def main(argv=None) -> int:
    args = parse_args(argv)
    maybe_reexec_with_openblas(args, print, script=__file__)
    import httpx

    from dgemma_mlx import load
    from dgemma_mlx.generate import build_prompt, generate

    if args.checkpoint:
        checkpoint = Path(args.checkpoint)
    else:
        checkpoint = ensure_checkpoint(args.config, Path(args.cache_dir), seed=args.seed)[0]
    info = machine_info(args)
    model, tokenizer = load(checkpoint)
    proc, base_url = start_server(checkpoint)
    client = httpx.Client(timeout=3600)
    body = {"model": str(checkpoint), "messages": [{"role": "user", "content": QUESTION}], "seed": args.seed,
            "max_tokens": args.max_tokens, "steps": args.steps}

    def direct() -> tuple[float, str]:
        t = time.perf_counter()
        end = generate(model, tokenizer, build_prompt(tokenizer, QUESTION), seed=args.seed,
                       max_new_tokens=args.max_tokens, steps=args.steps)
        return time.perf_counter() - t, end.text

    def served() -> tuple[float, str]:
        t = time.perf_counter()
        r = client.post(base_url + "/chat/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["choices"][0]["message"]["content"]

    def streamed() -> tuple[float, str]:
        t = time.perf_counter()
        text, last = "", t
        with client.stream("POST", base_url + "/chat/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                        text += chunk["choices"][0]["delta"]["content"]
                        last = time.perf_counter()
        return last - t, text

    runs = {"direct": direct, "server": served, "server_stream": streamed}
    times: dict[str, list[float]] = {k: [] for k in runs}
    try:
        texts = {k: fn()[1] for k, fn in runs.items()}  # warm-up; also checks that the work is the same
        if len(set(texts.values())) != 1:
            raise RuntimeError("the server and the direct generation produced different texts")
        for i in range(args.repeats):
            for name, fn in runs.items():
                seconds, _ = fn()
                times[name].append(seconds)
                print(f"run {i + 1}/{args.repeats} {name:14s} {seconds:8.3f} s", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "serve-overhead", "time": datetime.now().isoformat(timespec="seconds"),
        "checkpoint": str(checkpoint), "config": None if args.checkpoint else args.config,
        "request": {k: v for k, v in body.items() if k != "model"}, "machine": info,
        "loadavg_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "seconds": times, "median_seconds": med,
        "ratio_server": med["server"] / med["direct"], "ratio_server_stream": med["server_stream"] / med["direct"],
    }
    out = Path(args.json) if args.json else HERE / "results" / (
        f"serve-overhead-{result['config'] or 'checkpoint'}-{datetime.now():%Y%m%d-%H%M%S}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"direct {med['direct']:.3f} s · server {med['server']:.3f} s ({result['ratio_server']:.3f}x) · "
          f"streamed, last token {med['server_stream']:.3f} s ({result['ratio_server_stream']:.3f}x)\n-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
