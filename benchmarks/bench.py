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
import glob
import importlib.util
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Optional

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from workers import openblas_loaded  # noqa: E402  (benchmarks/workers.py)

ALL_IMPLS = ("ours", "transformers", "mlx-vlm")
PHASES = ("prefill", "step", "commit", "e2e")
BENCH_VERSION = 1
OPENBLAS_CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]


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


# ------------------------------------------------------------------------------------ preload
def find_openblas() -> Optional[str]:
    for c in OPENBLAS_CANDIDATES:
        if os.path.exists(c):
            return c
    found = sorted(glob.glob("/usr/lib*/**/libopenblas*.so*", recursive=True))
    return found[0] if found else None


def maybe_reexec_with_openblas(args: argparse.Namespace, say, script: Optional[str] = None) -> None:
    """On Linux, MLX's CPU wheel ships a slow reference BLAS: re-run this script (or ``script``)
    with OpenBLAS preloaded (once), unless it already is or ``--no-preload`` was given."""
    if not sys.platform.startswith("linux") or args.no_preload or os.environ.get("DGEMMA_BENCH_REEXEC"):
        return
    if "openblas" in os.environ.get("LD_PRELOAD", "") or openblas_loaded():
        return
    lib = find_openblas()
    if lib is None:
        say("[yellow]OpenBLAS not found: MLX will use its slow reference BLAS on this CPU "
            "(install libopenblas0-pthread, or pass --no-preload to silence this)[/]")
        return
    say(f"re-running with LD_PRELOAD={lib} (MLX's Linux CPU wheel uses a slow reference BLAS; "
        "--no-preload skips this)")
    env = dict(os.environ)
    env["LD_PRELOAD"] = ":".join(x for x in (lib, env.get("LD_PRELOAD", "")) if x)
    env["DGEMMA_BENCH_REEXEC"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, str(Path(script or __file__).resolve())] + sys.argv[1:], env)


# ------------------------------------------------------------------------------ model shape
def read_shape(checkpoint: Path) -> dict:
    """The shapes FLOP counting needs, from config.json (released form or ``per_layer_config`` form)."""
    cfg = json.loads((checkpoint / "config.json").read_text())
    t = cfg["text_config"]
    n = int(t["num_hidden_layers"])
    types = list(t.get("layer_types") or ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n)])
    types[-1] = "full_attention"
    hd = [int(t.get("head_dim", 256))] * n
    kv = [int(t["num_key_value_heads"])] * n
    plc = t.get("per_layer_config")
    if plc:
        for key, o in plc.items():
            idx = [i for i, x in enumerate(types) if x == key] if key in ("sliding_attention", "full_attention") else [int(key)]
            for i in idx:
                hd[i] = int(o.get("head_dim", hd[i]))
                kv[i] = int(o.get("num_key_value_heads", kv[i]))
    else:
        for i, x in enumerate(types):
            if x == "full_attention":
                hd[i] = int(t.get("global_head_dim") or 512)
                if t.get("num_global_key_value_heads") is not None:
                    kv[i] = int(t["num_global_key_value_heads"])
    return {
        "vocab_size": int(t["vocab_size"]), "hidden_size": int(t["hidden_size"]),
        "intermediate_size": int(t["intermediate_size"]), "moe_intermediate_size": int(t["moe_intermediate_size"]),
        "num_hidden_layers": n, "num_attention_heads": int(t["num_attention_heads"]),
        "layer_types": types, "layer_head_dims": hd, "layer_kv_heads": kv,
        "num_experts": int(t["num_experts"]), "top_k_experts": int(t["top_k_experts"]),
        "sliding_window": int(t["sliding_window"]), "canvas_length": int(cfg.get("canvas_length") or 256),
    }


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


# -------------------------------------------------------------------------------- machine info
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            return subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip()
        except Exception:
            pass
    return platform.processor() or platform.machine()


def total_memory_gb() -> Optional[float]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("mlx", "mlx-lm", "mlx-vlm", "torch", "transformers", "numpy", "dgemma-mlx"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def git_state() -> dict:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "dgemma_mlx"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head or None, "dgemma_mlx_dirty": bool(dirty)}
    except Exception:
        return {"commit": None}


def machine_info(args) -> dict:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    return {
        "platform": platform.platform(), "machine": platform.machine(), "cpu": cpu_name(),
        "cpu_count": os.cpu_count(), "cores_available": cores, "memory_gb": total_memory_gb(),
        "versions": versions(), "openblas_preloaded": bool(openblas_loaded()) if sys.platform.startswith("linux") else None,
        "ld_preload": os.environ.get("LD_PRELOAD") or None, "loadavg_start": _loadavg(), "git": git_state(),
    }


def _loadavg():
    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


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


# ---------------------------------------------------------------------------------- analysis
def get(d: Any, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def gemm_rate(machine: dict, which: str = "mlx", shape: str = "2048x2048x2048") -> Optional[float]:
    rates = [get(m, which, shape, "best_gflops") for m in machine.get("gemm", [])]
    rates = [r for r in rates if r]
    return max(rates) if rates else None


def derive(report: dict) -> None:
    """Add FLOP rates, scaling ratios and cross-implementation ratios to ``report``."""
    shape, results = report["shape"], report["results"]
    mlx_rate = gemm_rate(report["machine"], "mlx")
    mlx_rate_small = gemm_rate(report["machine"], "mlx", "256x2816x4096")
    torch_rate = gemm_rate(report["machine"], "torch")
    flops = report["flops"]
    for name, r in results.items():
        d = r.setdefault("derived", {})
        ref_rate = torch_rate if name == "transformers" else mlx_rate
        for P, st in (r.get("step") or {}).items():
            f = step_flops(shape, st["prefix"])["total"]
            rate = f / st["median_s"] / 1e9
            d.setdefault("step_gflops", {})[P] = rate
            if mlx_rate:
                d.setdefault("step_fraction_of_mlx_gemm", {})[P] = rate / mlx_rate
            if mlx_rate_small:
                d.setdefault("step_fraction_of_mlx_gemm_256x2816x4096", {})[P] = rate / mlx_rate_small
            if ref_rate:
                d.setdefault("step_fraction_of_own_gemm", {})[P] = rate / ref_rate
        for L, pf in (r.get("prefill") or {}).items():
            d.setdefault("prefill_gflops", {})[L] = flops["prefill"][L] / pf["seconds"] / 1e9
        steps = r.get("step") or {}
        if len(steps) >= 2:
            ks = sorted(steps, key=int)
            d["step_scaling"] = {"from": int(ks[0]), "to": int(ks[-1]),
                                 "ratio": steps[ks[-1]]["median_s"] / steps[ks[0]]["median_s"]}
        commits = r.get("commit") or {}
        C = shape["canvas_length"]
        commit_flops = {k: statistics.mean(prefill_flops(shape, C, start=p) for p in c["prefixes"])
                        for k, c in commits.items() if c.get("prefixes")}
        for k, f in commit_flops.items():
            d.setdefault("commit_gflops", {})[k] = f / commits[k]["median_s"] / 1e9
        if len(commits) >= 2:
            ks = sorted(commits, key=int)
            ratio = commits[ks[-1]]["median_s"] / commits[ks[0]]["median_s"]
            d["commit_scaling"] = {"from": int(ks[0]), "to": int(ks[-1]), "ratio": ratio}
            if ks[0] in commit_flops and ks[-1] in commit_flops:
                # Committing must attend over the longer prefix: the FLOPs themselves grow. Time per
                # FLOP shows whether anything beyond that work grows (e.g. re-encoding, cache copies).
                flop_ratio = commit_flops[ks[-1]] / commit_flops[ks[0]]
                d["commit_scaling"].update(flop_ratio=flop_ratio, time_per_flop_ratio=ratio / flop_ratio)
    ours = results.get("ours")
    comp = {}
    if ours:
        for other in ("transformers", "mlx-vlm"):
            o = results.get(other)
            if not o:
                continue
            c = {}
            for L in ours.get("prefill") or {}:
                if L in (o.get("prefill") or {}):
                    c[f"prefill_{L}"] = ours["prefill"][L]["tps"] / o["prefill"][L]["tps"]
            for P in ours.get("step") or {}:
                if P in (o.get("step") or {}):
                    c[f"step_{P}"] = o["step"][P]["median_s"] / ours["step"][P]["median_s"]
            for k in ours.get("commit") or {}:
                if k in (o.get("commit") or {}):
                    c[f"commit_{k}"] = o["commit"][k]["median_s"] / ours["commit"][k]["median_s"]
            for n in ours.get("e2e") or {}:
                a, b = get(ours, "e2e", n, "tps"), get(o, "e2e", n, "tps")
                if a and b:
                    c[f"e2e_{n}"] = a / b
            comp[f"ours_vs_{other}"] = c
    report["comparisons"] = comp


def verify(report: dict, vdir: Path) -> None:
    """Max |logits difference| of each implementation's first step (no SC, then SC) against the
    reference (transformers when it ran, else ours)."""
    import numpy as np

    names = [n for n in ALL_IMPLS if (vdir / f"{n}-nosc.npy").exists()]
    ref = "transformers" if "transformers" in names else ("ours" if "ours" in names else None)
    out = {"reference": ref, "max_abs_diff": {}}
    if ref is None:
        report["verify"] = out
        return
    for kind in ("nosc", "sc"):
        r = np.load(vdir / f"{ref}-{kind}.npy")
        for n in names:
            if n == ref:
                continue
            x = np.load(vdir / f"{n}-{kind}.npy")
            diff = float(np.abs(x - r).max()) if x.shape == r.shape else float("nan")
            out["max_abs_diff"].setdefault(n, {})[kind] = diff
    report["verify"] = out


# ------------------------------------------------------------------------------------- table
def fmt(x, spec: str = ".3f", suffix: str = "") -> str:
    if x is None:
        return "—"
    try:
        return f"{x:{spec}}{suffix}"
    except (TypeError, ValueError):
        return str(x)


def ratio_cell(x: Optional[float]) -> str:
    if x is None:
        return "—"
    color = "green" if x >= 1.05 else ("red" if x <= 0.95 else "white")
    return f"[{color}]{x:.2f}×[/]"


def render(report: dict, console) -> None:
    from rich import box
    from rich.table import Table

    res, comp, s = report["results"], report.get("comparisons", {}), report["shape"]
    impls = [n for n in ALL_IMPLS if n in res]
    others = [o for o in ("transformers", "mlx-vlm") if f"ours_vs_{o}" in comp]
    title = (f"DiffusionGemma — {report['config']}: {s['num_hidden_layers']} layers, hidden {s['hidden_size']}, "
             f"{s['num_experts']} experts top-{s['top_k_experts']}, vocab {s['vocab_size']}, canvas "
             f"{s['canvas_length']}, float32, {report['settings']['steps']} passes/block")
    t = Table(title=title, box=box.SIMPLE_HEAVY, title_justify="left")
    t.add_column("metric", style="bold")
    for n in impls:
        t.add_column(n, justify="right")
    for o in others:
        t.add_column(f"ours vs {o}", justify="right")

    def row(label, values, ratios=None, end_section=False):
        cells = [values.get(n, "—") for n in impls]
        rc = [ratio_cell(get(comp, f"ours_vs_{o}", ratios)) if ratios else "" for o in others]
        t.add_row(label, *cells, *rc, end_section=end_section)

    settings = report["settings"]
    for L in settings["prefill"]:
        row(f"prefill {L} tok (tok/s)", {n: fmt(get(res[n], "prefill", str(L), "tps"), ".1f") for n in impls},
            f"prefill_{L}")
    if settings["prefill"]:
        L = str(max(settings["prefill"]))
        row(f"  GFLOP/s prefill {L}", {n: fmt(get(res[n], "derived", "prefill_gflops", L), ".1f") for n in impls},
            end_section=True)
    for P in settings["prefixes"]:
        row(f"step @ prefix {P} (s)", {n: fmt(get(res[n], "step", str(P), "median_s")) for n in impls}, f"step_{P}")
    sc = {n: get(res[n], "derived", "step_scaling") for n in impls}
    if any(sc.values()):
        x = next(v for v in sc.values() if v)
        row(f"  step {x['to']} / step {x['from']}", {n: fmt(v and v["ratio"], ".2f", "×") for n, v in sc.items()})
    for P in settings["prefixes"]:
        vals = {}
        for n in impls:
            g = get(res[n], "derived", "step_gflops", str(P))
            fr = get(res[n], "derived", "step_fraction_of_mlx_gemm", str(P))
            vals[n] = "—" if g is None else f"{g:.1f}" + (f" ({fr:.0%})" if fr is not None else "")
        row(f"  GFLOP/s @ {P} (% of MLX GEMM)", vals, end_section=P == settings["prefixes"][-1])
    for k in settings["commit_blocks"]:
        row(f"commit after {k} block(s) (s)", {n: fmt(get(res[n], "commit", str(k), "median_s")) for n in impls},
            f"commit_{k}")
    cs = {n: get(res[n], "derived", "commit_scaling") for n in impls}
    if any(cs.values()):
        x = next(v for v in cs.values() if v)
        row(f"  commit after {x['to']} / after {x['from']}", {n: fmt(v and v["ratio"], ".2f", "×") for n, v in cs.items()})
        row("    its FLOPs (attention over the longer prefix)",
            {n: fmt(v and v.get("flop_ratio"), ".2f", "×") for n, v in cs.items()})
        row("    its time per FLOP", {n: fmt(v and v.get("time_per_flop_ratio"), ".2f", "×") for n, v in cs.items()},
            end_section=True)
    for n_new in settings["e2e"]:
        row(f"e2e {n_new} new tok (tok/s)", {n: fmt(get(res[n], "e2e", str(n_new), "tps"), ".2f") for n in impls},
            f"e2e_{n_new}")
        row("  tokens / forward", {n: fmt(get(res[n], "e2e", str(n_new), "tokens_per_forward"), ".1f") for n in impls},
            end_section=n_new == settings["e2e"][-1])
    row("peak memory: MLX (GB)", {n: fmt(get(res[n], "memory", "mlx_peak_gb"), ".2f") for n in impls})
    row("peak memory: max RSS (GB)", {n: fmt(get(res[n], "memory", "maxrss_gb"), ".2f") for n in impls})
    row("load (s)", {n: fmt(get(res[n], "load_s"), ".1f") for n in impls})
    v = report.get("verify") or {}
    if v.get("max_abs_diff"):
        row(f"max |Δlogits| vs {v['reference']} (no SC / SC)",
            {n: f"{d['nosc']:.1e} / {d['sc']:.1e}" for n, d in v["max_abs_diff"].items()})
    console.print(t)

    notes = []
    m = report["machine"]
    for g in m.get("gemm", []):
        mr = ", ".join(f"{k} {v['best_gflops']:.0f}" for k, v in (g.get("mlx") or {}).items())
        tr = ", ".join(f"{k} {v['best_gflops']:.0f}" for k, v in (g.get("torch") or {}).items())
        notes.append(f"GEMM float32 GFLOP/s ({g['when']}): MLX {mr or '—'}; torch {tr or '—'}")
    notes.append(f"machine: {m['cpu']}, {m['cores_available']} cores, {fmt(m['memory_gb'], '.0f')} GB; "
                 f"OpenBLAS preloaded: {m['openblas_preloaded']}")
    la = [f"{n} {res[n]['loadavg_start'][0]:.1f}→{(res[n].get('loadavg_end') or ['?'])[0]}" for n in impls
          if res[n].get("loadavg_start")]
    if la:
        notes.append("1-min load average during each run (this machine's cores are shared): " + ", ".join(la))
    gp = [f"{n} {fmt(get(res[n], 'gemm_probe_gflops', 'start'), '.0f')}→{fmt(get(res[n], 'gemm_probe_gflops', 'end'), '.0f')}"
          for n in impls if get(res[n], "gemm_probe_gflops")]
    if gp:
        notes.append("2048³ GEMM GFLOP/s at the start→end of each run (own framework): " + ", ".join(gp))
    for n in impls:
        info = res[n].get("info") or {}
        if n == "ours":
            notes.append(f"ours: experts strategy {info.get('experts_strategy')}")
        if n == "transformers":
            notes.append(f"transformers: experts_implementation={info.get('experts_implementation')} "
                         f"({info.get('grouped_mm_kernel') or 'n/a'}), attention {info.get('attn_implementation')}, "
                         f"{info.get('torch_threads')} threads")
        errs = res[n].get("errors") or {}
        for phase, e in errs.items():
            notes.append(f"[red]{n}: {phase} failed: {e}[/]")
    for n, why in report.get("skipped", {}).items():
        notes.append(f"[yellow]{n}: skipped, {why}[/]")
    notes.append("ratio columns: how many times faster ours is (>1: ours faster); GFLOP/s = analytic FLOPs of "
                 "one step / its median time")
    for line in notes:
        console.print(f"  {line}")

    strat = get(res, "ours", "strategies")
    if strat:
        st = Table(title="ours: expert strategies (the choice is made by measurement)", box=box.SIMPLE,
                   title_justify="left")
        st.add_column("strategy", style="bold")
        cols = [("prefill", L) for L in sorted({L for v in strat.values() for L in (v.get("prefill") or {})}, key=int)]
        cols += [("step", P) for P in sorted({P for v in strat.values() for P in (v.get("step") or {})}, key=int)]
        for kind, k in cols:
            st.add_column(f"prefill {k} (tok/s)" if kind == "prefill" else f"step @{k} (s)", justify="right")
        for name, v in strat.items():
            cells = []
            for kind, k in cols:
                if kind == "prefill":
                    cells.append(fmt(get(v, "prefill", k, "tps"), ".1f"))
                else:
                    cells.append(fmt(get(v, "step", k, "median_s")))
            st.add_row(name + (" (auto)" if name == get(res, "ours", "info", "experts_strategy") else ""), *cells)
        console.print(st)


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
        gemm = []

        def measure_machine(when: str) -> None:
            r, err = run_worker({"impl": "machine", "torch_threads": args.torch_threads}, workdir, 600, console.print)
            r["when"] = when
            gemm.append(r)
            report["machine"]["gemm"] = gemm

        console.print("measuring the machine's float32 GEMM rate ...")
        measure_machine("start")
        for impl in args.impl:
            why = available(impl)
            if why:
                console.print(f"[yellow]{impl}: skipped, {why}[/]")
                report["skipped"][impl] = why
                continue
            console.print(f"[bold]── {impl}[/]")
            result, err = run_worker(dict(base_task, impl=impl), workdir, args.timeout, console.print)
            if err:
                console.print(f"[red]{impl}: {err}[/]")
            report["results"][impl] = result
        measure_machine("end")
        report["machine"]["loadavg_end"] = _loadavg()
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
