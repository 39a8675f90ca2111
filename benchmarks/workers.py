"""The measuring side of ``bench.py``: one subprocess per implementation (and one for the machine).

``python benchmarks/workers.py TASK.json OUT.json`` loads one implementation, runs the phases the task
asks for and rewrites OUT.json after each phase (so a crash or a timeout keeps what was measured).
Progress goes to stderr as ``[impl] ...`` lines.

Every implementation is driven through the same small adapter (:class:`Impl`): load, a fresh prefix
cache, ``encode`` (timed: prefill and commits), ``extend`` (untimed set-up: growing the prefix),
``prepare`` (per-canvas set-up that the implementation's own generate loop does once per block, such as
masks), ``step`` (one denoising pass with self-conditioning, evaluated) and ``generate`` (its own
end-to-end loop).
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
SC_TEMPERATURE = 0.6  # self-conditioning input of the timed steps: the previous step's logits / T
NEVER_CONFIDENT = 1e-9  # confidence threshold that random weights never reach: every block runs all steps


def log(name: str, msg: str) -> None:
    print(f"[{name}] {msg}", file=sys.stderr, flush=True)


def maxrss_gb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e9 if sys.platform == "darwin" else r * 1024 / 1e9


def write_json(path: Path, data: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


# ------------------------------------------------------------------------------------- adapters
class Impl:
    """What every implementation provides to the phases."""

    name = "?"
    is_mlx = False

    def new_cache(self) -> Any: ...
    def encode(self, cache: Any, ids: np.ndarray) -> None: ...  # timed; synchronous
    def extend(self, cache: Any, ids: np.ndarray) -> None:  # untimed set-up; may chunk differently
        self.encode(cache, ids)
    def prefix_len(self, cache: Any) -> int: ...
    def prepare(self, cache: Any, canvas: np.ndarray) -> Any: ...
    def step(self, cache: Any, ctx: Any, sc: Any) -> Any: ...  # returns logits, evaluated
    def make_sc(self, logits: Any) -> Any: ...  # previous logits / T, evaluated
    def to_numpy(self, logits: Any) -> np.ndarray: ...
    def generate(self, prompt: list[int], max_new: int, steps: int, seed: int) -> dict: ...
    def peak_gb(self) -> Optional[float]:
        return None
    def info(self) -> dict:
        return {}
    def collect(self) -> None:
        gc.collect()

    def gemm_probe(self) -> Optional[float]:
        """This framework's float32 2048³ GEMM rate right now (GFLOP/s, best of 3): how much of the
        shared machine this run had."""
        return mlx_gemm_probe()


def mlx_gemm_probe(n: int = 2048) -> float:
    import mlx.core as mx

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    return _rate(lambda: mx.eval(a @ b), 2.0 * n**3, runs=3)["best_gflops"]


class MlxImpl(Impl):
    """An MLX implementation: ``self.mx`` is ``mlx.core``."""

    is_mlx = True

    def make_sc(self, logits):
        sc = logits * (1.0 / SC_TEMPERATURE)
        self.mx.eval(sc)
        return sc


class Ours(MlxImpl):
    name = "ours"

    def __init__(self, checkpoint: str, task: dict):
        import mlx.core as mx

        from dgemma_mlx import load

        self.mx = mx
        self.model, self.tokenizer = load(checkpoint, dtype="float32")
        self.model.args.eos_token_ids = []  # never stop at EOS: every run makes all its tokens
        experts = task.get("experts", "auto")
        self.set_strategy("auto" if experts == "all" else experts)

    def set_strategy(self, strategy: str) -> None:
        for layer in self.model.layers:
            layer.experts.strategy = strategy

    def resolved_strategy(self) -> str:
        experts = self.model.layers[0].experts
        resolve = getattr(experts, "resolved_strategy", None)
        return resolve() if callable(resolve) else experts.strategy

    def new_cache(self):
        return self.model.make_cache()

    def encode(self, cache, ids):
        self.model.encode(self.mx.array(np.asarray(ids, dtype=np.int32))[None], cache)

    def prefix_len(self, cache):
        return cache.offset

    def prepare(self, cache, canvas):
        c = self.mx.array(np.asarray(canvas, dtype=np.int32))[None]
        self.mx.eval(c)
        return c

    def step(self, cache, ctx, sc):
        logits = self.model.denoise(ctx, cache, sc)
        self.mx.eval(logits)
        return logits

    def to_numpy(self, logits):
        return np.array(logits[0])

    def generate(self, prompt, max_new, steps, seed):
        from dgemma_mlx.generate import stream_generate

        t = time.perf_counter()
        end = None
        for event in stream_generate(
            self.model, self.tokenizer, prompt, steps=steps, max_new_tokens=max_new, seed=seed,
            confidence_threshold=NEVER_CONFIDENT,
        ):
            end = event
        wall = time.perf_counter() - t
        s = end.stats
        return {
            "tokens": s.generated_tokens, "forwards": s.steps, "tokens_per_forward": s.tokens_per_forward,
            "prefill_s": s.prompt_seconds, "wall_s": wall, "reported_tps": s.generation_tps,
        }

    def peak_gb(self):
        return self.mx.get_peak_memory() / 1e9

    def info(self):
        return {"experts_strategy": self.resolved_strategy(), "dtype": str(self.model.dtype)}

    def collect(self):
        gc.collect()
        self.mx.clear_cache()


class _NeverStop:
    """mlx-vlm stopping criteria that never fire (EOS off, as for the other implementations)."""

    def __call__(self, token) -> bool:
        return False

    def add_eos_token_ids(self, *a, **k) -> None:
        pass

    def reset(self, *a, **k) -> None:
        pass


class MlxVlm(MlxImpl):
    name = "mlx-vlm"
    PREFILL_STEP = 2048  # mlx-vlm's default prefill step size

    def __init__(self, checkpoint: str, task: dict):
        import mlx.core as mx
        from mlx_vlm import load

        self.mx = mx
        self.model, self.processor = load(checkpoint)
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.tokenizer.stopping_criteria = _NeverStop()
        gc_ = getattr(self.model.config, "generation_config", None)
        if isinstance(gc_, dict):
            gc_["confidence_threshold"] = NEVER_CONFIDENT
            gc_.pop("eos_token_id", None)
        self.embedding = self.model.diffusion_prepare_self_conditioning()

    def new_cache(self):
        return {"c": self.model.make_cache(), "n": 0}

    def _eval_cache(self, cache):
        self.mx.eval([c.state for c in cache["c"]])

    def encode(self, cache, ids):
        ids_mx = self.mx.array(np.asarray(ids, dtype=np.int32))[None]
        if cache["n"] == 0:  # the prompt: its prefill path
            cache["c"] = self.model.diffusion_prefill_cache(
                ids_mx, attention_mask=None, cache=cache["c"], pixel_values=None, mm_token_type_ids=None,
                prefill_step_size=self.PREFILL_STEP, chunk_prefill=len(ids) > self.PREFILL_STEP,
            )
        else:  # a committed block: its per-block cache update
            cache["c"] = self.model.diffusion_update_cache(ids_mx, cache=cache["c"])
        self._eval_cache(cache)
        cache["n"] += len(ids)

    def extend(self, cache, ids):
        for start in range(0, len(ids), self.PREFILL_STEP):
            chunk = ids[start : start + self.PREFILL_STEP]
            cache["c"] = self.model.diffusion_update_cache(
                self.mx.array(np.asarray(chunk, dtype=np.int32))[None], cache=cache["c"]
            )
            self._eval_cache(cache)
            cache["n"] += len(chunk)

    def prefix_len(self, cache):
        return cache["n"]

    def prepare(self, cache, canvas):
        c = self.mx.array(np.asarray(canvas, dtype=np.int32))[None]
        masks = self.model.diffusion_decoder_masks(c, cache["c"], None)
        return c, masks

    def step(self, cache, ctx, sc):
        canvas, masks = ctx
        sc_in = None if sc is None else self.model.diffusion_self_conditioning(sc, self.embedding)
        logits = self.model.diffusion_decoder_logits(canvas, cache["c"], sc_in, masks)
        self.mx.eval(logits)
        return logits

    def to_numpy(self, logits):
        return np.array(logits[0].astype(self.mx.float32))

    def generate(self, prompt, max_new, steps, seed):
        from mlx_vlm.generate.diffusion import stream_diffusion_generate

        self.mx.random.seed(seed)
        ids = self.mx.array([prompt], dtype=self.mx.int32)
        t = time.perf_counter()
        last = None
        for r in stream_diffusion_generate(
            self.model, self.processor, self.tokenizer, ids, None, None,
            max_tokens=max_new, skip_special_token_ids=[], temperature=1.0,
            max_denoising_steps=steps, diffusion_full_canvas=True, diffusion_sampler="entropy-bound",
            prefill_step_size=self.PREFILL_STEP,
        ):
            last = r
        wall = time.perf_counter() - t
        forwards = int(last.diffusion_denoising_steps)
        prefill_s = last.prompt_tokens / max(last.prompt_tps, 1e-9)
        return {
            "tokens": int(last.generation_tokens), "forwards": forwards,
            "tokens_per_forward": last.generation_tokens / max(forwards, 1),
            "prefill_s": prefill_s, "wall_s": wall, "reported_tps": last.generation_tps,
        }

    def peak_gb(self):
        return self.mx.get_peak_memory() / 1e9

    def info(self):
        import mlx_vlm

        return {
            "mlx_vlm_version": getattr(mlx_vlm, "__version__", "?"),
            "dtype": str(self.model.model.decoder.embed_tokens.weight.dtype),
            "sampler": "entropy-bound (the reference's), temperature 1.0, full canvas",
        }

    def collect(self):
        gc.collect()
        self.mx.clear_cache()


class Transformers(Impl):
    name = "transformers"
    ENCODE_CHUNK = 2048  # for growing the prefix only (timed encodes run in one pass, as generate does)

    def __init__(self, checkpoint: str, task: dict):
        import torch
        from transformers import DiffusionGemmaForBlockDiffusion

        self.torch = torch
        torch.set_num_threads(int(task.get("torch_threads") or 2))
        kwargs = {"dtype": torch.float32}
        if task.get("hf_experts"):
            kwargs["experts_implementation"] = task["hf_experts"]
        self.model = DiffusionGemmaForBlockDiffusion.from_pretrained(checkpoint, **kwargs).eval()
        self.C = self.model.config.canvas_length

    def new_cache(self):
        from transformers import DynamicCache

        return {"c": DynamicCache(config=self.model.config.get_text_config(decoder=True)), "n": 0}

    def encode(self, cache, ids):
        torch = self.torch
        n, L = cache["n"], len(ids)
        with torch.no_grad():
            self.model.model.encoder(
                input_ids=torch.as_tensor(np.asarray(ids, dtype=np.int64))[None],
                cache=cache["c"],
                position_ids=torch.arange(n, n + L, dtype=torch.int32)[None],
            )
        cache["n"] += L

    def extend(self, cache, ids):
        for start in range(0, len(ids), self.ENCODE_CHUNK):
            self.encode(cache, ids[start : start + self.ENCODE_CHUNK])

    def prefix_len(self, cache):
        return cache["n"]

    def prepare(self, cache, canvas):
        torch = self.torch
        c = torch.as_tensor(np.asarray(canvas, dtype=np.int64))[None]
        P = cache["n"]
        with torch.no_grad():
            masks = self.model.model.decoder.create_diffusion_decoder_attention_mask(
                config=self.model.config,
                inputs_embeds=c.unsqueeze(-1),
                cache=cache["c"],
                decoder_attention_mask=torch.ones((1, P + c.shape[1]), dtype=torch.bool),
            )
        pos = torch.arange(P, P + c.shape[1], dtype=torch.int32)[None]
        return c, masks, pos

    def step(self, cache, ctx, sc):
        canvas, masks, pos = ctx
        with self.torch.no_grad():
            out = self.model(
                decoder_input_ids=canvas, cache=cache["c"], self_conditioning_logits=sc,
                decoder_attention_mask=masks, decoder_position_ids=pos,
            )
        return out.logits

    def make_sc(self, logits):
        return logits / SC_TEMPERATURE

    def to_numpy(self, logits):
        return logits[0].float().numpy()

    def generate(self, prompt, max_new, steps, seed):
        torch = self.torch
        encoder = self.model.model.encoder
        times: list[float] = []
        start: list[float] = []
        h1 = encoder.register_forward_pre_hook(lambda *a: start.append(time.perf_counter()))
        h2 = encoder.register_forward_hook(lambda *a: times.append(time.perf_counter() - start[-1]))
        torch.manual_seed(seed)
        try:
            t = time.perf_counter()
            out = self.model.generate(
                input_ids=torch.tensor([prompt], dtype=torch.long), max_new_tokens=max_new,
                max_denoising_steps=steps, confidence_threshold=NEVER_CONFIDENT,
                eos_token_id=None, pad_token_id=None,
            )
            wall = time.perf_counter() - t
        finally:
            h1.remove()
            h2.remove()
        tokens = int(out.sequences.shape[1] - len(prompt))
        tpf = float(out.tokens_per_forward.reshape(-1)[0])
        return {
            "tokens": tokens, "forwards": round(tokens / tpf) if tpf else None, "tokens_per_forward": tpf,
            "prefill_s": times[0] if times else 0.0, "wall_s": wall,
        }

    def gemm_probe(self):
        torch, n = self.torch, 2048
        a, b = torch.randn(n, n), torch.randn(n, n)
        return _rate(lambda: a @ b, 2.0 * n**3, runs=3)["best_gflops"]

    def info(self):
        import torch
        import transformers

        requested = self.model.config._experts_implementation
        native = None
        if requested == "grouped_mm":
            try:
                from transformers.integrations.moe import _can_use_grouped_mm

                w = self.model.model.decoder.layers[0].experts.gate_up_proj
                x = torch.zeros((4, w.shape[-1]))
                native = bool(_can_use_grouped_mm(x, w, torch.tensor([4] + [4] * (w.shape[0] - 1))))
            except Exception as e:  # an internal helper: report rather than fail
                native = f"unknown ({type(e).__name__})"
        kernel = {True: "torch.nn.functional.grouped_mm", False: "per-expert torch.mm loop (fallback)"}
        return {
            "experts_implementation": requested,
            "grouped_mm_kernel": kernel.get(native, native) if requested == "grouped_mm" else None,
            "attn_implementation": self.model.config._attn_implementation,
            "torch_threads": torch.get_num_threads(),
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
        }


IMPLS = {"ours": Ours, "transformers": Transformers, "mlx-vlm": MlxVlm}


# --------------------------------------------------------------------------------------- phases
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
            self.result["loadavg_start"] = _loadavg()
            self.result["gemm_probe_gflops"] = {"start": self.impl.gemm_probe()}
            self.save()
            self.warmup()
            self.result["phases_done"].append("warmup")
        except Exception as e:
            self.result["errors"]["load"] = _err(e)
            log(self.name, f"FAILED to load/warm up: {_err(e)}")
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
                self.result["errors"][name] = _err(e)
                log(self.name, f"phase {name} FAILED: {_err(e)}")
                traceback.print_exc()
                self.impl.collect()
            self.save()
        self.result["loadavg_end"] = _loadavg()
        try:
            self.result["gemm_probe_gflops"]["end"] = self.impl.gemm_probe()
        except Exception as e:
            self.result["errors"]["gemm_probe"] = _err(e)
        self.result["ok"] = not self.result["errors"]
        self.result["total_s"] = time.perf_counter() - t0
        self.save()
        return 0 if self.result["ok"] else 1


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _err(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:500]


# -------------------------------------------------------------------------------------- machine
def _rate(fn, flop: float, runs: int = 5) -> dict:
    fn()
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return {"best_gflops": flop / min(ts) / 1e9, "median_gflops": flop / statistics.median(ts) / 1e9}


GEMM_SHAPES = [(2048, 2048, 2048), (256, 2816, 4096)]


def machine(task: dict, out: Path) -> int:
    """Float32 GEMM rates of MLX and torch on this machine, right now."""
    res: dict = {"mlx": {}, "torch": {}}
    try:
        import mlx.core as mx

        res["mlx_device"] = str(mx.default_device())
        for m, k, n in GEMM_SHAPES:
            a = mx.random.normal((m, k))
            b = mx.random.normal((k, n))
            mx.eval(a, b)
            res["mlx"][f"{m}x{k}x{n}"] = _rate(lambda: mx.eval(a @ b), 2.0 * m * k * n)
    except Exception as e:
        res["mlx_error"] = _err(e)
    try:
        import torch

        torch.set_num_threads(int(task.get("torch_threads") or 2))
        for m, k, n in GEMM_SHAPES:
            a = torch.randn(m, k)
            b = torch.randn(k, n)
            res["torch"][f"{m}x{k}x{n}"] = _rate(lambda: a @ b, 2.0 * m * k * n)
        res["torch_threads"] = torch.get_num_threads()
    except Exception as e:
        res["torch_error"] = _err(e)
    res["openblas_loaded"] = openblas_loaded()
    write_json(out, res)
    return 0


def openblas_loaded() -> Optional[bool]:
    """Whether libopenblas is mapped into this process (Linux only; None elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            return "libopenblas" in f.read()
    except OSError:
        return None


def main(argv: list[str]) -> int:
    task = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    if task.get("impl") == "machine":
        return machine(task, out)
    return Runner(task, out).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
