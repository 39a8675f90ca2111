"""Running the phases a task asks for on one implementation, saving after each phase."""

from __future__ import annotations

import statistics
import time
import traceback
from pathlib import Path
from typing import Optional

import numpy as np

from common import short_error, log, maxrss_gb, write_json
from engines import IMPLS, Impl, Ours
from probe import loadavg


class Runner:
    def __init__(self, task: dict, out: Path):
        self.task = task
        self.out = out
        self.name = task["impl"]
        self.rng = np.random.default_rng(task.get("seed", 0))
        self.V = int(task["vocab_size"])
        self.C = int(task["canvas_length"])
        self.result: dict = {"impl": self.name, "ok": False, "phases_done": [], "errors": {}}
        self.peak = 0.0
        self.mem_after_load: dict = {}
        self.impl: Optional[Impl] = None

    def save(self) -> None:
        self.result["memory"] = {
            "mlx_peak_gb": self.peak if self.impl and self.impl.is_mlx else None,
            "maxrss_gb": maxrss_gb(),
            **self.mem_after_load,
        }
        write_json(self.out, self.result)

    def track_peak(self) -> None:
        p = self.impl.peak_gb() if self.impl else None
        if p is not None:
            self.peak = max(self.peak, p)

    def ids(self, n: int, rng=None) -> np.ndarray:
        return (rng or self.rng).integers(0, self.V, n).astype(np.int32)

    # ---- helpers
    def timed(self, fn, *args):
        t = time.perf_counter()
        r = fn(*args)
        return time.perf_counter() - t, r

    def strategies(self) -> list[Optional[str]]:
        """Expert strategies to time side by side: with ``--experts all`` (ours), gather and grouped;
        otherwise just the implementation as configured (None)."""
        if self.task.get("experts") == "all" and isinstance(self.impl, Ours):
            return ["gather", "grouped"]
        return [None]

    def use(self, strategy: Optional[str]) -> None:
        if strategy is not None:
            self.impl.set_strategy(strategy)

    def restore(self) -> None:
        if isinstance(self.impl, Ours) and self.task.get("experts") == "all":
            self.impl.set_strategy("auto")

    def measure_steps(self, cache, canvas, repeats: int, verify: bool = False) -> dict:
        """A warm-up step without self-conditioning (its logits / T become the SC input), a warm-up
        step with SC, then ``repeats`` timed steps with SC; median reported. With several expert
        strategies the timed steps alternate between them (so load changes hit all alike).

        Returns ``{strategy or None: {"median_s", "all_s", "prefix"}}``."""
        impl = self.impl
        strategies = self.strategies()
        ctx = impl.prepare(cache, canvas)
        try:
            self.restore()
            first = impl.step(cache, ctx, None)
            sc = impl.make_sc(first)
            second = impl.step(cache, ctx, sc)
            if verify and self.task.get("verify_dir"):
                d = Path(self.task["verify_dir"])
                np.save(d / f"{self.name}-nosc.npy", impl.to_numpy(first))
                np.save(d / f"{self.name}-sc.npy", impl.to_numpy(second))
            del first, second
            if len(strategies) > 1:
                for strategy in strategies:  # warm each strategy's own kernels
                    self.use(strategy)
                    impl.step(cache, ctx, sc)
            times: dict = {st: [] for st in strategies}
            for _ in range(repeats):
                for strategy in strategies:
                    self.use(strategy)
                    dt, logits = self.timed(impl.step, cache, ctx, sc)
                    times[strategy].append(dt)
                    del logits
        finally:
            self.restore()
        del sc, ctx
        self.track_peak()
        P = impl.prefix_len(cache)
        return {st: {"median_s": statistics.median(t), "all_s": t, "prefix": P} for st, t in times.items()}

    def profile_step(self, cache, canvas) -> Optional[dict]:
        """With ``profile_repeats`` > 0 in the task (and an implementation that can, ours): a
        separate profiling pass after the timed steps, not part of them. A step without and one
        with self-conditioning (the reference logits), then ``profile_repeats`` part-by-part steps
        (:meth:`engines.Ours.profile_step`): the median seconds of each part, the sum of the step's
        parts (all but the sampler), and the profiled logits' max |difference| from the real step's
        (a check that the profile computes the same step)."""
        n = int(self.task.get("profile_repeats") or 0)
        impl = self.impl
        if n <= 0 or not hasattr(impl, "profile_step"):
            return None
        ctx = impl.prepare(cache, canvas)
        sc = impl.make_sc(impl.step(cache, ctx, None))
        ref = impl.to_numpy(impl.step(cache, ctx, sc))
        runs = []
        for _ in range(n):
            parts, logits = impl.profile_step(cache, ctx, sc)
            runs.append(parts)
        diff = float(np.abs(impl.to_numpy(logits) - ref).max())
        del logits, sc, ctx
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        self.track_peak()
        return {"prefix": impl.prefix_len(cache), "parts_s": med, "all": runs, "check_max_abs_diff": diff,
                "step_parts_s": sum(v for k, v in med.items() if k != "sampler")}

    def main_of(self, per: dict) -> dict:
        """The configured implementation's entry of a per-strategy result."""
        if None in per:
            return per[None]
        return per[self.impl.resolved_strategy()]

    # ---- phases
    def warmup(self) -> None:
        """Run every shape once (kernel compilation, BLAS threads, allocator)."""
        impl = self.impl
        cache = impl.new_cache()
        n = min(512, max(self.task["prefill"] + [self.C]))
        impl.encode(cache, self.ids(n))
        impl.encode(cache, self.ids(self.C))
        self.measure_steps(cache, self.ids(self.C), repeats=1)
        del cache
        impl.collect()

    def phase_prefill(self) -> None:
        out = {}
        for L in self.task["prefill"]:
            cache = self.impl.new_cache()
            dt, _ = self.timed(self.impl.encode, cache, self.ids(L))
            out[str(L)] = {"seconds": dt, "tps": L / dt}
            log(self.name, f"prefill {L}: {dt:.3f} s ({L / dt:.1f} tok/s)")
            del cache
            self.track_peak()
            self.impl.collect()
            self.result["prefill"] = out
            self.save()

    def phase_steps_and_commits(self) -> None:
        """One growing prefix cache serves every step and commit point, in order of position."""
        task, impl = self.task, self.impl
        events = [(int(P), 0, "step") for P in task["prefixes"] if "step" in task["phases"]]
        events += [(int(k) * self.C, 1, "commit") for k in task["commit_blocks"] if "commit" in task["phases"]]
        events.sort()
        canvas = self.ids(self.C, np.random.default_rng(1234))
        prefix_rng = np.random.default_rng(4321)  # the same prefix tokens for every implementation
        steps_out, commits_out, strat_out = {}, {}, {}
        self.result["step"], self.result["commit"] = steps_out, commits_out
        cache = None
        verified = False
        for pos, _, kind in events:
            if cache is None or impl.prefix_len(cache) > pos:
                cache = None
                impl.collect()
                cache = impl.new_cache()
            grow = pos - impl.prefix_len(cache)
            if grow > 0:
                dt, _ = self.timed(impl.extend, cache, self.ids(grow, prefix_rng))
                log(self.name, f"prefix grown to {impl.prefix_len(cache)} ({dt:.1f} s)")
            if kind == "step":
                per = self.measure_steps(cache, canvas, task["repeats"], verify=not verified)
                verified = True
                r = self.main_of(per)
                steps_out[str(pos)] = r
                log(self.name, f"step @{r['prefix']}: {r['median_s']:.3f} s (median of {len(r['all_s'])})")
                for strategy, rr in per.items():
                    if strategy is not None:
                        strat_out.setdefault(strategy, {}).setdefault("step", {})[str(pos)] = rr
                        log(self.name, f"  experts={strategy}: step @{rr['prefix']}: {rr['median_s']:.3f} s")
                if strat_out:
                    self.result["strategies"] = strat_out
                prof = self.profile_step(cache, canvas)
                if prof:
                    self.result.setdefault("profile", {})[str(pos)] = prof
                    top = sorted(prof["parts_s"].items(), key=lambda kv: -kv[1])[:4]
                    log(self.name, f"profile @{prof['prefix']} (separate pass): step parts "
                        f"{prof['step_parts_s']:.3f} s; " + ", ".join(f"{k} {v:.3f}" for k, v in top)
                        + f"; |Δlogits| {prof['check_max_abs_diff']:.1e}")
            else:
                k = pos // self.C
                times, prefixes = [], []
                for _ in range(task["commit_repeats"]):
                    prefixes.append(impl.prefix_len(cache))
                    dt, _ = self.timed(impl.encode, cache, self.ids(self.C, prefix_rng))
                    times.append(dt)
                commits_out[str(k)] = {"median_s": statistics.median(times), "all_s": times, "prefixes": prefixes}
                log(self.name, f"commit after {k} block(s) (prefix {prefixes[0]}..{prefixes[-1]}): "
                    f"{statistics.median(times):.3f} s (median of {len(times)})")
            self.track_peak()
            self.save()
        del cache
        impl.collect()

    def phase_e2e(self) -> None:
        out = {}
        self.result["e2e"] = out
        prompt = self.ids(self.task["e2e_prompt"], np.random.default_rng(99)).tolist()
        for n in self.task["e2e"]:
            r = self.impl.generate(prompt, int(n), int(self.task["steps"]), int(self.task.get("seed", 0)))
            gen_s = r["wall_s"] - r["prefill_s"]
            r.update(gen_s=gen_s, tps=r["tokens"] / gen_s if gen_s > 0 else None, prompt_tokens=len(prompt))
            out[str(n)] = r
            log(self.name, f"e2e {n} new tokens: {r['tps']:.2f} tok/s ({r['tokens']} tokens, "
                f"{r['forwards']} forwards, {r['tokens_per_forward']:.1f} tok/forward, wall {r['wall_s']:.1f} s)")
            self.track_peak()
            self.impl.collect()
            self.save()

    def phase_strategy_prefill(self) -> None:
        """With ``--experts all``: prefill of the smallest length with each expert strategy,
        alternating between them ``repeats`` times."""
        impl = self.impl
        L = min(self.task["prefill"])
        strategies = self.strategies()
        times: dict = {st: [] for st in strategies}
        try:
            for strategy in strategies:  # warm-up
                self.use(strategy)
                impl.encode(impl.new_cache(), self.ids(min(L, 512)))
            for _ in range(self.task["repeats"]):
                for strategy in strategies:
                    self.use(strategy)
                    cache = impl.new_cache()
                    dt, _ = self.timed(impl.encode, cache, self.ids(L))
                    times[strategy].append(dt)
                    del cache
                    impl.collect()
        finally:
            self.restore()
        out = self.result.setdefault("strategies", {})
        for strategy, t in times.items():
            med = statistics.median(t)
            out.setdefault(strategy, {}).setdefault("prefill", {})[str(L)] = {"seconds": med, "all_s": t, "tps": L / med}
            log(self.name, f"  experts={strategy}: prefill {L}: {L / med:.1f} tok/s (median of {len(t)})")
        self.save()

    def run(self) -> int:
        self.impl = None
        t0 = time.perf_counter()
        try:
            cls = IMPLS[self.name]
            log(self.name, "loading ...")
            dt, self.impl = self.timed(cls, self.task["checkpoint"], self.task)
            self.track_peak()
            self.result["load_s"] = dt
            self.mem_after_load = {"after_load_mlx_gb": self.impl.peak_gb(), "after_load_maxrss_gb": maxrss_gb()}
            self.result["info"] = self.impl.info()
            log(self.name, f"loaded in {dt:.1f} s {self.result['info']}")
            self.result["loadavg_start"] = loadavg()
            self.result["gemm_probe_gflops"] = {"start": self.impl.gemm_probe()}
            self.save()
            self.warmup()
            self.result["phases_done"].append("warmup")
        except Exception as e:
            self.result["errors"]["load"] = short_error(e)
            log(self.name, f"FAILED to load/warm up: {short_error(e)}")
            self.save()
            return 1
        phases = self.task["phases"]
        plan = [
            ("prefill", self.phase_prefill, "prefill" in phases),
            ("steps_commits", self.phase_steps_and_commits, "step" in phases or "commit" in phases),
            ("e2e", self.phase_e2e, "e2e" in phases),
            ("strategies", self.phase_strategy_prefill,
             self.task.get("experts") == "all" and isinstance(self.impl, Ours) and "prefill" in phases),
        ]
        for name, fn, enabled in plan:
            if not enabled:
                continue
            try:
                fn()
                self.result["phases_done"].append(name)
            except Exception as e:
                self.result["errors"][name] = short_error(e)
                log(self.name, f"phase {name} FAILED: {short_error(e)}")
                traceback.print_exc()
                self.impl.collect()
            self.save()
        self.result["loadavg_end"] = loadavg()
        try:
            self.result["gemm_probe_gflops"]["end"] = self.impl.gemm_probe()
        except Exception as e:
            self.result["errors"]["gemm_probe"] = short_error(e)
        self.result["ok"] = not self.result["errors"]
        self.result["total_s"] = time.perf_counter() - t0
        self.save()
        return 0 if self.result["ok"] else 1
