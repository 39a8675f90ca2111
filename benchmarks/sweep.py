#!/usr/bin/env python
"""CPU shape sweep of the denoising step, ours against transformers (issue 14: where does our step
lose time, and how does that depend on the shape?).

    python benchmarks/sweep.py --dry-run          # the plan: shapes, float32 sizes, memory and time estimates
    python benchmarks/sweep.py                    # the default plan (one factor at a time), ~25 min quiet
    python benchmarks/sweep.py --plan grid        # the full 2x2x2x2 grid of hidden x experts x width x vocab
    python benchmarks/sweep.py --scale tiny --prefixes 64 --repeats 1   # smoke test, ~2 min
    python benchmarks/sweep.py --show benchmarks/results/sweep-<time>.json   # its tables again

Every shape is a random checkpoint built (and cached) by ``checkpoints.py``; each implementation runs in
its own subprocess through bench.py's machinery (``workers.py``: only the step phase), so the step,
its GFLOP/s, the GEMM rate it is set against and the logits check mean exactly what they mean in
``bench.py``. Ours also gets a separate part-by-part profiling pass (``--profile-repeats``). See
``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import csv_ints, csv_strs, measure_machine, run_impls  # noqa: E402  (modules of benchmarks/)
from checkpoints import BenchSpec, ensure_checkpoint, param_count, spec_dict, spec_for  # noqa: E402
from flops import prefill_flops, read_shape, shape_from_config, step_flops  # noqa: E402
from probe import loadavg, machine_info, maybe_reexec_with_openblas  # noqa: E402
from report import ALL_IMPLS, derive, fmt, gemm_rate, get, verify  # noqa: E402

SWEEP_VERSION = 1
FACTORS = ("hidden", "experts", "width", "vocab")

# The two levels of each factor (base, changed). "real" is issue 14's sweep; "tiny" keeps the plan
# and the machinery but makes every shape small (a smoke test of the script, not a measurement).
LEVELS = {
    "real": {"hidden": (1024, 2816), "experts": ((32, 4), (128, 8)), "width": (512, 704), "vocab": (32_768, 262_144)},
    "tiny": {"hidden": (64, 96), "experts": ((8, 2), (16, 4)), "width": (32, 48), "vocab": (1024, 4096)},
}
# The named config (checkpoints.py) whose attention (heads, head dims, kv heads, window) and dense MLP
# width go with each hidden level: 1024 takes mid's, 2816 real-shape's (the released model's).
ATTENTION_FROM = {"real": ("mid", "real-shape"), "tiny": ("tiny", "tiny")}

# The default plan: the base, one shape per changed factor, and the real combination.
FACTOR_PLAN = {
    "base": (0, 0, 0, 0),
    "hidden": (1, 0, 0, 0),
    "experts": (0, 1, 0, 0),
    "width": (0, 0, 1, 0),
    "vocab": (0, 0, 0, 1),
    "real": (1, 1, 1, 1),
}

# Rough time model of --dry-run's estimates (a quiet 2-core box, float32, OpenBLAS).
EST_GFLOPS = 80.0  # effective rate of a step / an encoding pass, both implementations
EST_STEP_OVERHEAD_S = 0.05  # per step, beyond its FLOPs
EST_LOAD_GB_S = 0.5  # loading a checkpoint
EST_PROCESS_S = 15.0  # a worker's start (imports), warm-up set-up and GEMM probes
EST_BUILD_S_PER_GB = 15.0  # building a checkpoint with transformers (random init + save)


@dataclass
class Shape:
    name: str
    cell: tuple  # the level (0 base, 1 changed) of each factor, in FACTORS order
    spec: BenchSpec

    @property
    def cache_name(self) -> str:
        """The checkpoint cache entry: named by the shape itself, so plans share checkpoints."""
        s = self.spec
        return (f"sweep-h{s.hidden_size}-e{s.num_experts}x{s.top_k_experts}-w{s.moe_intermediate_size}"
                f"-v{s.vocab_size}-l{s.num_hidden_layers}")

    def describe(self) -> str:
        s = self.spec
        return (f"hidden {s.hidden_size}, {s.num_experts} experts top-{s.top_k_experts} x {s.moe_intermediate_size}, "
                f"vocab {s.vocab_size}, {s.num_hidden_layers} layers")


def cell_spec(cell: tuple, scale: str, layers: int) -> BenchSpec:
    lv = LEVELS[scale]
    h, e, w, v = cell
    experts, top_k = lv["experts"][e]
    return replace(
        spec_for(ATTENTION_FROM[scale][h], layers), hidden_size=lv["hidden"][h], num_experts=experts,
        top_k_experts=top_k, moe_intermediate_size=lv["width"][w], vocab_size=lv["vocab"][v],
    )


def grid_name(cell: tuple) -> str:
    """A grid cell's name, from the real plan's values (the same name at every --scale)."""
    lv = LEVELS["real"]
    h, e, w, v = cell
    return f"h{lv['hidden'][h]}-e{lv['experts'][e][0]}x{lv['experts'][e][1]}-w{lv['width'][w]}-v{lv['vocab'][v]}"


def plan_cells(plan: str) -> dict:
    if plan == "factors":
        return dict(FACTOR_PLAN)
    return {grid_name(c): c for c in itertools.product((0, 1), repeat=len(FACTORS))}


def plan_shapes(args) -> list[Shape]:
    cells = plan_cells(args.plan)
    names = args.shapes or list(cells)
    bad = [n for n in names if n not in cells]
    if bad:
        raise SystemExit(f"unknown shape '{bad[0]}' in plan '{args.plan}' (choose from {', '.join(cells)})")
    return [Shape(n, cells[n], cell_spec(cells[n], args.scale, args.layers)) for n in names]


def shape_dims(spec: BenchSpec) -> dict:
    """FLOP-counting shapes (flops.py) of a spec, without a checkpoint: read through ModelArgs from
    the same text config the built checkpoint will carry."""
    from dgemma_mlx.config import MODEL_TYPE

    return shape_from_config({"model_type": MODEL_TYPE, "text_config": spec.text_config(),
                              "canvas_length": spec.canvas_length})


# ------------------------------------------------------------------------------------- estimates
def memory_estimate(spec: BenchSpec, prefixes: list[int]) -> dict:
    """Float32 bytes (GB) of a shape: its text weights, a worker's peak (weights, ~10 logits-sized
    [C, V] float32 buffers: logits, SC input, softmax, soft cap, the logits check's copies; the KV
    cache at the largest prefix; the runtime) and the peak while building the checkpoint."""
    s = shape_dims(spec)
    weights = param_count(spec) * 4
    C, V, P, W = s["canvas_length"], s["vocab_size"], max(prefixes), s["sliding_window"]
    kv = sum(2 * (P if t == "full_attention" else min(P, W)) * n * d * 4
             for t, n, d in zip(s["layer_types"], s["layer_kv_heads"], s["layer_head_dims"]))
    worker = 1.08 * weights + 10 * C * V * 4 + kv + 0.4e9
    return {"weights_gb": weights / 1e9, "worker_peak_gb": worker / 1e9, "build_peak_gb": (1.6 * weights + 0.5e9) / 1e9}


def time_estimate(spec: BenchSpec, args) -> dict:
    """Rough seconds of one shape (see the EST_ constants): the steps each worker runs (warm-up,
    2 + --repeats per prefix, ours' profiling pass), growing the prefix, loading, and (once) building."""
    s = shape_dims(spec)
    C = s["canvas_length"]

    def step_s(P: int) -> float:
        return step_flops(s, P)["total"] / (EST_GFLOPS * 1e9) + EST_STEP_OVERHEAD_S

    weights_gb = param_count(spec) * 4 / 1e9
    encode = (prefill_flops(s, 2 * C) + prefill_flops(s, max(args.prefixes))) / (EST_GFLOPS * 1e9)
    base = EST_PROCESS_S + weights_gb / EST_LOAD_GB_S + encode + 3 * step_s(2 * C)
    timed = sum((2 + args.repeats) * step_s(P) for P in args.prefixes)
    profile = sum((2 + args.profile_repeats) * step_s(P) for P in args.prefixes) if args.profile_repeats else 0.0
    out = {"step_s": {str(P): step_s(P) for P in args.prefixes}, "build_s": 15 + EST_BUILD_S_PER_GB * weights_gb}
    per = {"ours": base + timed + profile, "transformers": base + timed, "mlx-vlm": base + timed}
    out["run_s"] = sum(per[i] for i in args.impl)
    return out


# ---------------------------------------------------------------------------------------- args
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Shape sweep of the denoising step: ours against transformers, one factor at a time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--plan", default="factors", choices=["factors", "grid"],
                   help="factors: base + one shape per changed factor + the real combination; grid: all 16")
    p.add_argument("--shapes", type=csv_strs, default=None, help="run only these shapes of the plan (comma-separated)")
    p.add_argument("--scale", default="real", choices=list(LEVELS),
                   help="real: issue 14's sizes; tiny: the same plan with tiny stand-ins (smoke test)")
    p.add_argument("--layers", type=int, default=2, help="layers per shape (5 sliding : 1 full, last full)")
    p.add_argument("--prefixes", type=csv_ints, default=[256, 4096], help="prefix lengths at which the step is timed")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per prefix (median reported)")
    p.add_argument("--profile-repeats", type=int, default=2,
                   help="part-by-part profiling passes of our step per prefix (0: no profile)")
    p.add_argument("--impl", type=csv_strs, default=["ours", "transformers"],
                   help="implementations, comma-separated (of " + ", ".join(ALL_IMPLS) + ")")
    p.add_argument("--experts", default="auto", choices=["auto", "gather", "grouped"], help="our expert strategy")
    p.add_argument("--hf-experts", default=None, help="transformers experts_implementation (default: its own)")
    p.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads for transformers")
    p.add_argument("--timeout", type=float, default=0, help="seconds allowed per implementation and shape (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the checkpoints' weights and of the tokens")
    p.add_argument("--cache-dir", default="~/.cache/dgemma-bench", help="where built checkpoints are kept")
    p.add_argument("--drop-checkpoints", action="store_true",
                   help="delete each shape's checkpoint after its run (disk space: the grid's take ~60 GB)")
    p.add_argument("--json", default=None, help="results file (default benchmarks/results/sweep-<time>.json)")
    p.add_argument("--no-preload", action="store_true", help="do not re-run with OpenBLAS preloaded (Linux)")
    p.add_argument("--no-verify", action="store_true", help="skip the cross-implementation logits check")
    p.add_argument("--dry-run", action="store_true", help="print the plan with size and time estimates, run nothing")
    p.add_argument("--show", default=None, metavar="JSON", help="print the tables of an earlier sweep's JSON, run nothing")
    a = p.parse_args(argv)
    bad = [i for i in a.impl if i not in ALL_IMPLS]
    if bad:
        p.error(f"unknown implementation '{bad[0]}' (choose from {', '.join(ALL_IMPLS)})")
    if a.layers < 1 or a.repeats < 1 or a.profile_repeats < 0 or not a.prefixes:
        p.error("--layers and --repeats must be >= 1, --profile-repeats >= 0, and --prefixes not empty")
    a.prefixes = sorted(set(a.prefixes))
    return a


# ---------------------------------------------------------------------------------------- plan
def print_plan(shapes: list[Shape], args, console) -> None:
    from rich import box
    from rich.table import Table

    t = Table(title=f"sweep plan '{args.plan}' (scale {args.scale}, {args.layers} layers, prefixes "
                    f"{', '.join(map(str, args.prefixes))}, {', '.join(args.impl)})",
              box=box.SIMPLE_HEAVY, title_justify="left")
    for col in ("shape", "hidden", "heads x dim (sliding / full)", "dense MLP", "experts", "width", "vocab",
                "weights GB", "worker peak GB", "build peak GB", "est. step (s)", "est. run (min)", "est. build (min)"):
        t.add_column(col, justify="left" if col.startswith(("shape", "heads")) else "right", no_wrap=col == "shape")
    total_run = total_build = total_disk = 0.0
    for sh in shapes:
        s, mem, est = sh.spec, memory_estimate(sh.spec, args.prefixes), time_estimate(sh.spec, args)
        total_run += est["run_s"]
        total_build += est["build_s"]
        total_disk += mem["weights_gb"]
        t.add_row(
            sh.name, str(s.hidden_size),
            f"{s.num_attention_heads}x{s.head_dim} / {s.num_attention_heads}x{s.global_head_dim}",
            str(s.intermediate_size), f"{s.num_experts} top-{s.top_k_experts}", str(s.moe_intermediate_size),
            str(s.vocab_size), f"{mem['weights_gb']:.2f}", f"{mem['worker_peak_gb']:.1f}",
            f"{mem['build_peak_gb']:.1f}",
            " / ".join(f"{v:.2f}" for v in est["step_s"].values()), f"{est['run_s'] / 60:.1f}",
            f"{est['build_s'] / 60:.1f}",
        )
    console.print(t)
    console.print(f"  estimated: {total_run / 60:.0f} min of runs + {total_build / 60:.0f} min building checkpoints "
                  f"not cached yet; {total_disk:.1f} GB of checkpoints on disk under {args.cache_dir}")
    console.print(f"  (rough: {EST_GFLOPS:.0f} GFLOP/s for every step and encoding, loading at {EST_LOAD_GB_S} GB/s; "
                  "memory: float32 weights, the worker's peak (weights + ~10 canvas × vocab float32 buffers + KV "
                  "cache), building ~1.6x the weights. Implementations run one after another, so the worker peak "
                  "is the machine's need.)")


# ------------------------------------------------------------------------------------- results
def summarize(report: dict) -> None:
    """Bench's derived numbers (derive) for every shape, then the sweep's per-prefix summary."""
    for sub in report["shapes"].values():
        view = dict(sub, machine=report["machine"])
        derive(view)
        sub["comparisons"] = view["comparisons"]
        res = sub["results"]
        summary = {}
        for P in map(str, sub["settings"]["prefixes"]):
            ours, hf = get(res, "ours", "step", P, "median_s"), get(res, "transformers", "step", P, "median_s")
            summary[P] = {
                "ours_s": ours, "transformers_s": hf,
                "ratio_ours_over_transformers": ours / hf if ours and hf else None,
                "ours_gflops": get(res, "ours", "derived", "step_gflops", P),
                "ours_fraction_of_mlx_gemm": get(res, "ours", "derived", "step_fraction_of_mlx_gemm", P),
                "transformers_gflops": get(res, "transformers", "derived", "step_gflops", P),
                "ours_profile_s": get(res, "ours", "profile", P, "parts_s"),
                "ours_profile_step_parts_s": get(res, "ours", "profile", P, "step_parts_s"),
            }
        sub["summary"] = summary


def profile_groups(parts: dict) -> dict:
    """The profile's parts of the step as the table shows them (seconds; the sampler is apart)."""
    return {
        "experts+router": parts["experts"] + parts["router"],
        "attention": parts["attention"],
        "dense MLP": parts["dense_mlp"],
        "LM head + cap": parts["lm_head_softcap"],
        "SC softmax": parts["sc_softmax"],
        "SC soft emb": parts["sc_soft_embedding"],
        "SC MLP": parts["sc_mlp"],
        "other": parts["embedding"] + parts["layer_rest"],
    }


def render(report: dict, console) -> None:
    from rich import box
    from rich.table import Table

    mlx_rate = gemm_rate(report["machine"], "mlx")
    canvas = {sub["shape"]["canvas_length"] for sub in report["shapes"].values()}
    t = Table(title=f"denoising step with self-conditioning, ours vs transformers — plan '{report['plan']}', "
                    f"scale {report['scale']}, {report['settings']['layers']} layers, float32, canvas "
                    f"{'/'.join(map(str, sorted(canvas)))}", box=box.SIMPLE_HEAVY, title_justify="left")
    for col in ("shape", "hidden", "experts", "width", "vocab", "prefix", "ours (s)", "transformers (s)",
                "ours / transformers", "ours GFLOP/s (% GEMM)", "transformers GFLOP/s",
                "|Δlogits| no SC / SC"):
        t.add_column(col, justify="left" if col == "shape" else "right", no_wrap=col == "shape")
    for name, sub in report["shapes"].items():
        s = sub["shape"]
        diff = get(sub, "verify", "max_abs_diff", "ours")
        for i, (P, row) in enumerate(sub["summary"].items()):
            r = row["ratio_ours_over_transformers"]
            color = "white" if r is None else ("green" if r <= 0.95 else ("red" if r >= 1.05 else "white"))
            g, fr = row["ours_gflops"], row["ours_fraction_of_mlx_gemm"]
            t.add_row(
                name if i == 0 else "", str(s["hidden_size"]) if i == 0 else "",
                f"{s['num_experts']} top-{s['top_k_experts']}" if i == 0 else "",
                str(s["moe_intermediate_size"]) if i == 0 else "", str(s["vocab_size"]) if i == 0 else "", P,
                fmt(row["ours_s"]), fmt(row["transformers_s"]), f"[{color}]{fmt(r, '.2f')}[/]",
                "—" if g is None else f"{g:.1f}" + (f" ({fr:.0%})" if fr is not None else ""),
                fmt(row["transformers_gflops"], ".1f"),
                f"{diff['nosc']:.1e} / {diff['sc']:.1e}" if diff and i == 0 else "",
                end_section=i == len(sub["summary"]) - 1,
            )
    console.print(t)

    rows = [(name, P, row) for name, sub in report["shapes"].items() for P, row in sub["summary"].items()
            if row["ours_profile_s"]]
    if rows:
        groups = list(profile_groups(rows[0][2]["ours_profile_s"]))
        pt = Table(title="ours: where the step's time goes — a separate profiling pass, not the timed step "
                         "(each part evaluated alone; % of the parts' sum; the sampler, run on the logits "
                         "after the step, as + % of it)", box=box.SIMPLE, title_justify="left")
        for col in ["shape", "prefix", "step (s)", "parts' sum (s)"] + groups + ["sampler"]:
            pt.add_column(col, justify="left" if col == "shape" else "right", no_wrap=col == "shape")
        last = None
        for name, P, row in rows:
            g = profile_groups(row["ours_profile_s"])
            total = sum(g.values()) or 1.0
            pt.add_row(name if name != last else "", P, fmt(row["ours_s"]), fmt(total),
                       *[f"{g[k] / total:.0%}" for k in groups], f"+{row['ours_profile_s']['sampler'] / total:.0%}")
            last = name
        console.print(pt)

    m = report["machine"]
    notes = []
    for g in m.get("gemm", []):
        mr = ", ".join(f"{k} {v['best_gflops']:.0f}" for k, v in (g.get("mlx") or {}).items())
        tr = ", ".join(f"{k} {v['best_gflops']:.0f}" for k, v in (g.get("torch") or {}).items())
        notes.append(f"GEMM float32 GFLOP/s ({g['when']}): MLX {mr or '—'}; torch {tr or '—'}")
    notes.append(f"machine: {m['cpu']}, {m['cores_available']} cores, {fmt(m['memory_gb'], '.0f')} GB; OpenBLAS "
                 f"preloaded: {m['openblas_preloaded']}; 1-min load {fmt((m.get('loadavg_start') or [None])[0], '.1f')}"
                 f" → {fmt((m.get('loadavg_end') or [None])[0], '.1f')}")
    for name, why in report.get("build_failed", {}).items():
        notes.append(f"[red]{name}: not run, {why}[/]")
    for name, sub in report["shapes"].items():
        for impl, r in sub["results"].items():
            for phase, e in (r.get("errors") or {}).items():
                notes.append(f"[red]{name}: {impl}: {phase} failed: {e}[/]")
            prof = r.get("profile") or {}
            bad = [P for P, p in prof.items() if p["check_max_abs_diff"] > 1e-3]
            if bad:
                notes.append(f"[red]{name}: the profile's logits differ from the step's at prefix {', '.join(bad)}[/]")
        for impl, why in sub.get("skipped", {}).items():
            notes.append(f"[yellow]{name}: {impl} skipped, {why}[/]")
    notes.append("ours / transformers: step time ratio (< 1: ours faster); GFLOP/s = analytic FLOPs of one step / "
                 f"its median time; % of the best MLX 2048³ GEMM rate of the run ({fmt(mlx_rate, '.0f')} GFLOP/s)")
    for line in notes:
        console.print(f"  {line}")


# ---------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    args = parse_args(argv)
    if args.show:
        render(json.loads(Path(args.show).read_text()), Console(width=None if sys.stdout.isatty() else 200))
        return 0
    shapes = plan_shapes(args)
    if args.dry_run:
        print_plan(shapes, args, Console(width=None if sys.stdout.isatty() else 200))
        return 0
    maybe_reexec_with_openblas(args, console.print)
    started = time.perf_counter()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.json) if args.json else HERE / "results" / (
        f"sweep-{'' if args.scale == 'real' else args.scale + '-'}{stamp}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    print_plan(shapes, args, Console(stderr=True, width=None if sys.stderr.isatty() else 200))

    settings = {k: getattr(args, k) for k in ("plan", "scale", "layers", "prefixes", "repeats", "profile_repeats",
                                               "impl", "experts", "hf_experts", "torch_threads", "seed")}
    settings["dtype"] = "float32"
    report: dict = {
        "sweep_version": SWEEP_VERSION, "created": datetime.now().isoformat(timespec="seconds"),
        "plan": args.plan, "scale": args.scale, "settings": settings, "machine": machine_info(args), "shapes": {},
    }

    def save() -> None:
        summarize(report)
        report["total_s"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=2))

    workdir = Path(tempfile.mkdtemp(prefix="dgemma-sweep-"))
    try:
        console.print("measuring the machine's float32 GEMM rate ...")
        measure_machine(report["machine"], "start", args.torch_threads, workdir, console.print)
        for n, sh in enumerate(shapes, 1):
            console.print(f"[bold]══ {sh.name} ({n}/{len(shapes)}): {sh.describe()}[/]")
            try:
                checkpoint, spec, _ = ensure_checkpoint(sh.cache_name, Path(args.cache_dir), seed=args.seed,
                                                        log=console.print, spec=sh.spec)
            except RuntimeError as e:  # e.g. killed for memory while building: go on with the next shape
                console.print(f"[red]{sh.name}: {e}[/]")
                report.setdefault("build_failed", {})[sh.name] = str(e)
                continue
            shape = read_shape(checkpoint)
            sdir = workdir / sh.name
            vdir = sdir / "verify"
            vdir.mkdir(parents=True)
            sub = {
                "name": sh.name, "factors": dict(zip(FACTORS, sh.cell)), "checkpoint": str(checkpoint),
                "spec": spec_dict(spec), "shape": shape, "memory_estimate": memory_estimate(spec, args.prefixes),
                "settings": {"prefixes": args.prefixes, "prefill": [], "commit_blocks": [], "e2e": []},
                "flops": {"step": {str(P): step_flops(shape, P) for P in args.prefixes}, "prefill": {}},
                "loadavg_start": loadavg(), "results": {}, "skipped": {},
            }
            task = {
                "checkpoint": str(checkpoint), "vocab_size": shape["vocab_size"],
                "canvas_length": shape["canvas_length"],
                "experts": args.experts, "hf_experts": args.hf_experts, "prefixes": args.prefixes, "prefill": [],
                "commit_blocks": [], "e2e": [], "e2e_prompt": 0, "steps": 0, "repeats": args.repeats,
                "commit_repeats": 0, "phases": ["step"], "torch_threads": args.torch_threads, "seed": args.seed,
                "verify_dir": None if args.no_verify else str(vdir), "profile_repeats": args.profile_repeats,
            }
            t = time.perf_counter()
            report["shapes"][sh.name] = sub
            run_impls(sub, args.impl, task, sdir, args.timeout, console)
            if not args.no_verify:
                verify(sub, vdir)
            sub["wall_s"] = time.perf_counter() - t
            sub["loadavg_end"] = loadavg()
            shutil.rmtree(sdir, ignore_errors=True)
            if args.drop_checkpoints:
                shutil.rmtree(checkpoint, ignore_errors=True)
            save()
        measure_machine(report["machine"], "end", args.torch_threads, workdir, console.print)
        report["machine"]["loadavg_end"] = loadavg()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if report["shapes"]:
            save()
    render(report, Console(width=None if sys.stdout.isatty() else 200))
    console.print(f"results written to {out} (total {report['total_s'] / 60:.1f} min)")
    failed = [f"{n}/{i}" for n, sub in report["shapes"].items() for i, r in sub["results"].items() if not r.get("ok")]
    return 1 if failed or report.get("build_failed") else 0


if __name__ == "__main__":
    sys.exit(main())
