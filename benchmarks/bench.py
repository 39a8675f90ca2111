#!/usr/bin/env python
"""Benchmark dgemma-mlx against the transformers reference and mlx-vlm on the same random checkpoint.

    python benchmarks/bench.py --config mid
    python benchmarks/bench.py --config real-shape --impl ours,transformers,mlx-vlm
    python benchmarks/bench.py --config tiny --prefixes 256,1024 --e2e 256   # smoke test

Each implementation runs in its own subprocess (``workers.py``), one after another, so each has clean
memory and its own peak-memory reading. See ``benchmarks/README.md`` for what is measured and how to
read the ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.append(str(REPO))  # dgemma_mlx, when it is not installed

from flops import prefill_flops, read_shape, step_flops  # noqa: E402  (modules of benchmarks/)
from probe import loadavg, machine_info, maybe_reexec_with_openblas  # noqa: E402
from report import ALL_IMPLS, derive, render, verify  # noqa: E402


PHASES = ("prefill", "step", "commit", "e2e")
BENCH_VERSION = 1


# --------------------------------------------------------------------------------- arguments
def csv_ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def csv_strs(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark dgemma-mlx (ours) against transformers and mlx-vlm on one random checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", default="mid", choices=["tiny", "mid", "real-shape"],
                   help="named random checkpoint to build (or reuse from --cache-dir)")
    p.add_argument("--checkpoint", default=None, help="use this checkpoint directory instead of building one")
    p.add_argument("--cache-dir", default="~/.cache/dgemma-bench", help="where built checkpoints are kept")
    p.add_argument("--layers", type=int, default=None,
                   help="layer count of the built checkpoint (default: tiny 2, mid 6, real-shape 3)")
    p.add_argument("--impl", default=",".join(ALL_IMPLS), help="implementations to run, comma-separated")
    p.add_argument("--experts", default="auto", choices=["auto", "gather", "grouped", "all"],
                   help="our expert strategy; 'all' also times each strategy's step and prefill")
    p.add_argument("--hf-experts", default=None,
                   help="transformers experts_implementation (default: its own default, grouped_mm)")
    p.add_argument("--prefixes", type=csv_ints, default=[256, 2048, 8192],
                   help="prefix lengths at which one denoising step is timed")
    p.add_argument("--prefill", type=csv_ints, default=[256, 2048], help="prompt lengths whose encoding is timed")
    p.add_argument("--commit-blocks", type=csv_ints, default=[1, 16],
                   help="commit (encode) a block after this many earlier blocks")
    p.add_argument("--e2e", type=csv_ints, default=[256, 1024], help="new-token counts for end-to-end generation")
    p.add_argument("--e2e-prompt", type=int, default=256, help="prompt length for end-to-end generation")
    p.add_argument("--steps", type=int, default=8, help="denoising passes per block in end-to-end generation")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per step point (median reported)")
    p.add_argument("--commit-repeats", type=int, default=3, help="timed commits per commit point (median)")
    p.add_argument("--phases", type=csv_strs, default=list(PHASES), help="subset of: " + ",".join(PHASES))
    p.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads for transformers")
    p.add_argument("--timeout", type=float, default=0, help="seconds allowed per implementation (0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="seed of the built checkpoint's weights and of generation")
    p.add_argument("--json", default=None, help="results file (default benchmarks/results/<config>-<time>.json)")
    p.add_argument("--no-preload", action="store_true", help="do not re-run with OpenBLAS preloaded (Linux)")
    p.add_argument("--no-verify", action="store_true", help="skip the cross-implementation logits check")
    a = p.parse_args(argv)
    a.impl = csv_strs(a.impl)
    bad = [i for i in a.impl if i not in ALL_IMPLS]
    if bad:
        p.error(f"unknown implementation '{bad[0]}' (choose from {', '.join(ALL_IMPLS)})")
    bad = [x for x in a.phases if x not in PHASES]
    if bad:
        p.error(f"unknown phase '{bad[0]}' (choose from {', '.join(PHASES)})")
    return a


# ----------------------------------------------------------------------------------- running
def worker_env() -> dict:
    env = dict(os.environ)
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env["PYTHONWARNINGS"] = env.get("PYTHONWARNINGS") or "ignore"
    return env


def run_worker(task: dict, workdir: Path, timeout: float, say) -> tuple[dict, Optional[str]]:
    """Run one worker subprocess; return its result JSON and an error string (None when it exited 0)."""
    name = task["impl"]
    task_file = workdir / f"task-{name}.json"
    out_file = workdir / f"result-{name}.json"
    task_file.write_text(json.dumps(task))
    cmd = [sys.executable, str(HERE / "workers.py"), str(task_file), str(out_file)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=worker_env(), start_new_session=True)
    error = None
    try:
        rc = proc.wait(timeout=timeout or None)
        if rc != 0:
            error = f"worker exited with code {rc}" + (" (killed: out of memory?)" if rc in (-9, 137) else "")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        error = f"timed out after {timeout:.0f} s (partial results kept)"
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    result = json.loads(out_file.read_text()) if out_file.exists() else {"impl": name, "ok": False}
    result["wall_s"] = time.perf_counter() - t
    if error:
        result.setdefault("errors", {})["worker"] = error
    return result, error


def available(impl: str) -> Optional[str]:
    """None when ``impl`` can run here, else why not."""
    need = {"ours": ["mlx", "dgemma_mlx"], "transformers": ["torch", "transformers"], "mlx-vlm": ["mlx", "mlx_vlm"]}[impl]
    missing = [m for m in need if importlib.util.find_spec(m) is None]
    return f"not importable ({', '.join(missing)} missing)" if missing else None


def measure_machine(machine: dict, when: str, torch_threads: int, workdir: Path, say) -> None:
    """Measure the machine's float32 GEMM rates now (a worker subprocess); append to ``machine["gemm"]``."""
    r, _ = run_worker({"impl": "machine", "torch_threads": torch_threads}, workdir, 600, say)
    r["when"] = when
    machine.setdefault("gemm", []).append(r)


def run_impls(report: dict, impls: list[str], base_task: dict, workdir: Path, timeout: float, console) -> None:
    """Run each available implementation's worker in turn on ``base_task``; results (or why an
    implementation was skipped) go into ``report["results"]`` / ``report["skipped"]``."""
    for impl in impls:
        why = available(impl)
        if why:
            console.print(f"[yellow]{impl}: skipped, {why}[/]")
            report["skipped"][impl] = why
            continue
        console.print(f"[bold]── {impl}[/]")
        result, err = run_worker(dict(base_task, impl=impl), workdir, timeout, console.print)
        if err:
            console.print(f"[red]{impl}: {err}[/]")
        report["results"][impl] = result


# -------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    args = parse_args(argv)
    maybe_reexec_with_openblas(args, console.print)
    started = time.perf_counter()

    from checkpoints import ensure_checkpoint

    if args.checkpoint:
        checkpoint = Path(args.checkpoint).expanduser().resolve()
        config_name = f"custom ({checkpoint.name})"
        if not (checkpoint / "config.json").exists():
            console.print(f"[red]{checkpoint}: no config.json[/]")
            return 2
    else:
        checkpoint, _, _ = ensure_checkpoint(args.config, Path(args.cache_dir), layers=args.layers,
                                             seed=args.seed, log=console.print)
        config_name = args.config
    shape = read_shape(checkpoint)
    C = shape["canvas_length"]

    report: dict = {
        "bench_version": BENCH_VERSION, "created": datetime.now().isoformat(timespec="seconds"),
        "config": config_name, "checkpoint": str(checkpoint), "shape": shape,
        "settings": {
            "impl": args.impl, "experts": args.experts, "hf_experts": args.hf_experts, "prefixes": args.prefixes,
            "prefill": args.prefill, "commit_blocks": args.commit_blocks, "e2e": args.e2e,
            "e2e_prompt": args.e2e_prompt, "steps": args.steps, "repeats": args.repeats,
            "commit_repeats": args.commit_repeats, "phases": args.phases, "torch_threads": args.torch_threads,
            "seed": args.seed, "dtype": "float32", "eos": "disabled (every run makes all its tokens)",
            "adaptive_stopping": "on, confidence threshold 1e-9 (never reached): every block runs all passes",
        },
        "machine": machine_info(args), "results": {}, "skipped": {},
    }
    report["flops"] = {
        "step": {str(P): step_flops(shape, P) for P in args.prefixes},
        "prefill": {str(L): prefill_flops(shape, L) for L in args.prefill},
    }

    workdir = Path(tempfile.mkdtemp(prefix="dgemma-bench-"))
    vdir = workdir / "verify"
    vdir.mkdir()
    base_task = {
        "checkpoint": str(checkpoint), "vocab_size": shape["vocab_size"], "canvas_length": C,
        "experts": args.experts, "hf_experts": args.hf_experts, "prefixes": args.prefixes, "prefill": args.prefill,
        "commit_blocks": args.commit_blocks, "e2e": args.e2e, "e2e_prompt": args.e2e_prompt, "steps": args.steps,
        "repeats": args.repeats, "commit_repeats": args.commit_repeats, "phases": args.phases,
        "torch_threads": args.torch_threads, "seed": args.seed, "verify_dir": None if args.no_verify else str(vdir),
    }
    try:
        console.print("measuring the machine's float32 GEMM rate ...")
        measure_machine(report["machine"], "start", args.torch_threads, workdir, console.print)
        run_impls(report, args.impl, base_task, workdir, args.timeout, console)
        measure_machine(report["machine"], "end", args.torch_threads, workdir, console.print)
        report["machine"]["loadavg_end"] = loadavg()
        if not args.no_verify:
            verify(report, vdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    derive(report)
    report["total_s"] = time.perf_counter() - started
    out = Path(args.json) if args.json else HERE / "results" / (
        f"{args.config if not args.checkpoint else 'custom'}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    render(report, Console(width=None if sys.stdout.isatty() else 150))
    console.print(f"results written to {out} (total {report['total_s'] / 60:.1f} min)")
    failed = [n for n, r in report["results"].items() if not r.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
