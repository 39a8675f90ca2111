"""Turning measurements into a report: FLOP rates, scaling and cross-implementation ratios
(:func:`derive`), the replay check (:func:`verify`) and the table (:func:`render`)."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Optional

import numpy as np

from flops import prefill_flops, step_flops

ALL_IMPLS = ("ours", "transformers", "mlx-vlm")


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
