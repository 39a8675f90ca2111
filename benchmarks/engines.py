"""One adapter per implementation (:class:`Impl`): ours, mlx-vlm and the transformers
reference, driven identically by :class:`runner.Runner`."""

from __future__ import annotations

import gc
import time
from typing import Any, Optional

import numpy as np

from probe import measure_rate


SC_TEMPERATURE = 0.6  # self-conditioning input of the timed steps: the previous step's logits / T


NEVER_CONFIDENT = 1e-9  # confidence threshold that random weights never reach: every block runs all steps


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
    return measure_rate(lambda: mx.eval(a @ b), 2.0 * n**3, runs=3)["best_gflops"]


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
        from dgemma_mlx.ops import host_math

        with host_math():  # as generation runs its passes
            logits = self.model.denoise(ctx, cache, sc)
            self.mx.eval(logits)
        return logits

    def to_numpy(self, logits):
        return np.array(logits[0])

    PROFILE_PARTS = ("embedding", "sc_softmax", "sc_soft_embedding", "sc_mlp", "attention", "dense_mlp",
                     "router", "experts", "layer_rest", "lm_head_softcap", "sampler")

    def profile_step(self, cache, ctx, sc) -> tuple[dict, Any]:
        """One denoising step with self-conditioning cut into parts, each evaluated before the next
        starts and timed alone: a rough where-the-time-goes profile (the parts lose the overlap of
        one lazy graph, so they add up to a little more than a step). It follows
        :meth:`Model.denoise` and the denoise path of ``DecoderLayer.__call__`` (the runner checks
        its logits against a real step's), then runs the sampler (``sampler_step``, as generate
        does after each pass) on the logits; with host math, as generation runs a pass. Returns
        ``({part: seconds}, logits)``."""
        from dgemma_mlx.ops import host_math

        with host_math():
            return self._profile_step(cache, ctx, sc)

    def _profile_step(self, cache, ctx, sc) -> tuple[dict, Any]:
        from dgemma_mlx.ops import rows_in_parallel, softmax

        mx, m = self.mx, self.model
        if getattr(self, "_sampler_warm", None) != sc.shape:  # its kernels have not run yet: untimed once
            mx.eval(self._sampler(mx.zeros(sc.shape, dtype=mx.float32)))
            self._sampler_warm = sc.shape
        parts = dict.fromkeys(self.PROFILE_PARTS, 0.0)

        def run(part, fn, *args):
            t = time.perf_counter()
            out = fn(*args)
            mx.eval(out)
            parts[part] += time.perf_counter() - t
            return out

        h = run("embedding", m._embed, ctx)
        probs = run("sc_softmax", lambda: rows_in_parallel(softmax, sc.astype(m.dtype).astype(mx.float32)))
        soft = run("sc_soft_embedding", m.soft_embedding, probs)
        h = run("sc_mlp", m.self_conditioning, h, soft)
        offset = cache.offset
        for layer, c in zip(m.layers, cache.layers):
            r = run("attention", lambda x, L=layer, c=c: x + L.post_attention_layernorm(
                L.self_attn.denoise(L.input_layernorm(x), c, offset)), h)
            dense = run("dense_mlp", lambda x, L=layer: L.post_feedforward_layernorm_1(
                L.mlp(L.pre_feedforward_layernorm(x))), r)
            flat = r.reshape(-1, r.shape[-1])
            idx, w = run("router", layer.router, flat)
            moe = run("experts", lambda x, L=layer: L.post_feedforward_layernorm_2(
                L.experts(L.pre_feedforward_layernorm_2(x), idx, w).reshape(r.shape)), flat)
            h = run("layer_rest", lambda L=layer: (r + L.post_feedforward_layernorm(dense + moe)) * L.layer_scalar)
        logits = run("lm_head_softcap", m.logits, h)
        run("sampler", self._sampler, logits)
        return parts, logits

    def _sampler(self, logits) -> list:
        """The sampler's work on one pass's logits, with the checkpoint's settings (last pass of a
        block), evaluating what generation reads: the next self-conditioning input is ``probs``
        for a float32 model, the scaled logits otherwise (as ``refine_block`` chooses)."""
        from dgemma_mlx.generate import default_settings
        from dgemma_mlx.sampler import sampler_step

        s = default_settings(self.model)
        r = sampler_step(
            logits, step=1, max_steps=s.steps, t_min=s.t_min, t_max=s.t_max, entropy_bound=s.entropy_bound,
            confidence_threshold=s.confidence_threshold, history=[], stability_threshold=s.stability_threshold,
            key=self.mx.random.key(0),
        )
        signal = r.probs if self.model.dtype == self.mx.float32 else r.scaled
        return [r.canvas, r.argmax, r.accepted, r.entropy, r.mean_entropy, r.stop, signal]

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
        return measure_rate(lambda: a @ b, 2.0 * n**3, runs=3)["best_gflops"]

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
