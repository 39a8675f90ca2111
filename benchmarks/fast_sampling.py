"""Opt-in fast sampling against the reference's sampler, measured on the bundled models: quality,
passes and wall time side by side in one run.

Configurations (``--configs``): ``reference`` (the default sampler: at most 48 passes), the
presets ``fast`` (16) and ``faster`` (8), ``top-k`` (``top_k`` 64: sampler and self-conditioning
on each position's 64 most likely tokens), and ``freeze`` / ``freeze-fast`` / ``freeze-faster``
(``freeze_accepted``: an accepted position keeps its token; later passes compute only the others;
the free tail after a frozen EOS is EOS), and ``short-canvas`` (``short_canvas``: a last block with
fewer tokens left than a canvas holds only those positions).

* Sudoku (``--sudoku-model``, default the bundled ``sudoku``): exact-solve rate and blank-cell
  accuracy on the recipe's held-out puzzles (``--puzzles`` per band of ``--givens``), mean
  passes, seconds per puzzle (solved in batches of ``--batch-size``).
* Code (``--code-model``, default the bundled ``pycode``; needs ``recipes/code/work`` from the
  code recipe's ``prepare.py``): single-line infill exact match at the true hole length on
  ``--lines`` held-out lines, and function-body completion on ``--functions`` held-out functions:
  passes per block, tokens per pass, milliseconds per block. Short answers (``--continuations``
  held-out lines, ``--continuation-tokens`` generated after the whole lines before each): the
  share of generated tokens equal to the source's, position by position, and of first lines equal
  to the source's line, with passes and milliseconds per answer. This is where ``short-canvas``
  differs from ``reference`` (every other code measurement generates whole blocks), so it is the
  only code measurement that configuration runs.

``--speed-passes N`` also times N passes of one block for each configuration on a random
float32 model with the real vocabulary (262,144) and the sweep's small MoE stack, where the
sampler and self-conditioning weigh most. A random model accepts one position per pass, so
nearly every position stays active; ``short-canvas`` times a canvas of
:data:`SHORT_SPEED_TOKENS` positions (an answer of that many tokens) against the reference's whole one; ``--speed-pinned 0,0.75`` repeats the timing with that
fraction of the canvas pinned (spread evenly), standing in for a block's later passes where most
positions are accepted: ``freeze`` then computes only the rest, the reference still all of them
(with pins, only ``reference`` and the ``freeze`` configurations run). Each time is the median of
:data:`SPEED_REPEATS` runs after a warm-up run.

Each quality figure comes with its binomial standard error; a configuration's change against
``reference`` is "within noise" when it is under twice the combined standard error.

    python benchmarks/fast_sampling.py                       # JSON in benchmarks/results/
    python benchmarks/fast_sampling.py --puzzles 50 --lines 20 --functions 10 --configs reference,freeze
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def recipe(name: str):
    """A recipe's ``evaluate.py`` as a module (both recipes name theirs ``evaluate``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{name}_evaluate", ROOT / "recipes" / name / "evaluate.py")
    if spec.name not in sys.modules:
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
        spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]

CONFIGS = {
    "reference": {},
    "fast": {"steps": 16},
    "faster": {"steps": 8},
    "top-k": {"top_k": 64},
    "freeze": {"freeze_accepted": True},
    "freeze-fast": {"freeze_accepted": True, "steps": 16},
    "freeze-faster": {"freeze_accepted": True, "steps": 8},
    "short-canvas": {"short_canvas": True},
}
WHOLE_BLOCKS_ONLY = ("short-canvas",)
"""Configurations that change nothing when whole blocks are generated (Sudoku, infill, completion)."""


def stderr(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def sudoku_rows(model, tokenizer, givens: list[int], puzzles: int, batch_size: int, overrides: dict, seed: int):
    from dgemma_mlx.generate import default_settings
    from dgemma_mlx.sudoku import puzzles as make_puzzles
    from dgemma_mlx.sudoku import solve_batch

    PUZZLE_SEED = recipe("sudoku").PUZZLE_SEED

    settings = default_settings(model).update(**overrides)
    rows = []
    for g in givens:
        pairs = list(make_puzzles(PUZZLE_SEED + g, g, puzzles))
        solved = cells = blanks = used = 0
        start = time.perf_counter()
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i : i + batch_size]
            for (puzzle, solution), r in zip(chunk, solve_batch(model, tokenizer, [p for p, _ in chunk],
                                                                settings=settings, seed=seed + i)):
                free = [j for j in range(81) if puzzle[j] == 0]
                solved += r.valid
                blanks += len(free)
                cells += sum(r.board[j] == solution[j] for j in free)
                used += r.passes
        seconds = time.perf_counter() - start
        rate = solved / len(pairs)
        rows.append({"givens": g, "puzzles": len(pairs), "exact_solve_rate": rate, "stderr": stderr(rate, len(pairs)),
                     "cell_accuracy": cells / blanks, "mean_passes": used / len(pairs),
                     "ms_per_puzzle": 1000 * seconds / len(pairs)})
    return rows


def continuation_rows(model, tokenizer, items: list, tokens: int, overrides: dict, seed: int) -> dict:
    """Short answers: ``tokens`` tokens generated after the whole lines before each held-out line,
    compared with the source's next ``tokens`` tokens (position by position) and its line."""
    from dgemma_mlx.events import CommitEvent, EndEvent
    from dgemma_mlx.generate import stream_generate

    code = recipe("code")
    right = total = lines = passes = 0
    start = time.perf_counter()
    for k, (f, i) in enumerate(items):
        prompt = code.context(f.lines, i, tokenizer, 160)
        truth = tokenizer.encode("".join(f.lines[i:]), add_special_tokens=False)[:tokens]
        got = []
        for ev in stream_generate(model, tokenizer, prompt, seed=seed + k, max_new_tokens=tokens, **overrides):
            if isinstance(ev, CommitEvent):
                passes += ev.steps
            elif isinstance(ev, EndEvent):
                got = ev.tokens
        right += sum(a == b for a, b in zip(got, truth))
        total += len(truth)
        lines += tokenizer.decode(got).split("\n")[0].strip() == f.lines[i].strip()
    acc, line_rate = right / total, lines / len(items)
    return {"answers": len(items), "tokens": tokens, "token_accuracy": acc, "stderr": stderr(acc, total),
            "line_exact": line_rate, "line_stderr": stderr(line_rate, len(items)), "mean_passes": passes / len(items),
            "ms_per_answer": 1000 * (time.perf_counter() - start) / len(items)}


def code_rows(model, tokenizer, work: Path, lines: int, functions: int, overrides: dict, seed: int,
              continuations: int = 0, continuation_tokens: int = 16):
    code = recipe("code")
    complete, infill_items, infill_line = code.complete, code.infill_items, code.infill_line
    held = code.held_out_functions(work)
    out = {}
    if continuations:
        items = infill_items(held, tokenizer, continuations, random.Random(seed + 1))
        out["continuation"] = continuation_rows(model, tokenizer, items, continuation_tokens, overrides, seed)
    if lines:
        items = infill_items(held, tokenizer, lines, random.Random(seed))
        exact = passes = 0
        start = time.perf_counter()
        for k, (f, i) in enumerate(items):
            r = infill_line(model, tokenizer, f, i, seed=seed + k, context_tokens=160, fill_length=8, **overrides)
            exact += r["true_length"]["exact"]
            passes += r["true_length"]["passes"]
        rate = exact / len(items)
        out["infill"] = {"lines": len(items), "exact_match": rate, "stderr": stderr(rate, len(items)),
                         "mean_passes": passes / len(items),
                         "ms_per_line": 1000 * (time.perf_counter() - start) / len(items)}
    if functions:
        chosen = random.Random(seed).sample(held, min(functions, len(held)))
        blocks = []
        parsed = 0
        start = time.perf_counter()
        for k, f in enumerate(chosen):
            c = complete(model, tokenizer, f, seed=seed + k, context_tokens=160, max_tokens=128, **overrides)
            blocks += c["blocks"]
            parsed += c["parses"]
        seconds = time.perf_counter() - start
        n_passes = sum(b["passes"] for b in blocks)
        rate = parsed / len(chosen)
        out["completion"] = {"functions": len(chosen), "parse_rate": rate, "stderr": stderr(rate, len(chosen)),
                             "blocks": len(blocks), "passes_per_block": n_passes / max(len(blocks), 1),
                             "tokens_per_pass": sum(b["tokens"] for b in blocks) / max(n_passes, 1),
                             "ms_per_block": 1000 * seconds / max(len(blocks), 1)}
    return out


def random_config(**text) -> dict:
    """A DiffusionGemma ``config.json`` (canvas 256) with these ``text_config`` fields over common ones."""
    common = dict(max_position_embeddings=4096, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh",
                  rms_norm_eps=1e-6, use_bidirectional_attention="vision", bos_token_id=2, eos_token_id=1, pad_token_id=0)
    return dict(model_type="diffusion_gemma", canvas_length=256, text_config={**common, **text})


def random_model(config: dict, prompt: int, seed: int):
    """``(model, cache)``: a random float32 model of ``config`` and a cache holding ``prompt`` random tokens."""
    import mlx.core as mx

    from dgemma_mlx.config import ModelArgs
    from dgemma_mlx.model import Model

    args = ModelArgs.from_config(config)
    mx.random.seed(seed)
    model = Model(args)
    model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    cache = model.make_cache()
    model.encode(mx.random.randint(3, args.vocab_size, (1, prompt), key=mx.random.key(seed)), cache)
    return model, cache


# The sweep's vocabulary shape (benchmarks/sweep.py): a small MoE stack with the real vocabulary,
# where the sampler and self-conditioning are the largest part of a pass.
SPEED_SHAPE = random_config(
    vocab_size=262144, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=512,
    num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4, head_dim=128, global_head_dim=256,
    num_global_key_value_heads=2, sliding_window=512, num_experts=32, top_k_experts=4,
)


SPEED_REPEATS = 3
"""Timed runs per configuration after a warm-up run (the median is reported)."""

SHORT_SPEED_TOKENS = 64
"""The answer length ``short-canvas`` is timed with (its canvas holds that many positions)."""


def speed_rows(names: list[str], passes: int, prompt: int, seed: int, pinned: tuple[float, ...] = (0.0,)) -> list[dict]:
    """Wall time of ``passes`` denoising passes of one block on a random float32 model of
    :data:`SPEED_SHAPE` for each configuration and each fraction of pinned positions (the stop
    rule off, so every config runs them all)."""
    import numpy as np

    import mlx.core as mx

    from dgemma_mlx.refine import initial_canvas, refine_block
    from dgemma_mlx.settings import GenerationSettings

    model, cache = random_model(SPEED_SHAPE, prompt, seed)
    C, V = model.args.canvas_length, model.args.vocab_size
    rows = []
    for fraction in pinned:
        pins = None
        if fraction > 0:
            where = np.unique(np.round(np.linspace(0, C - 1, int(round(fraction * C)))).astype(int))
            p = np.full((1, C), -1, np.int32)
            p[0, where] = np.random.default_rng(seed).integers(3, V, len(where))
            pins = mx.array(p)
        for n in names:
            if fraction > 0 and n != "reference" and not CONFIGS[n].get("freeze_accepted"):
                continue  # pins change only what freezing computes
            if fraction > 0 and n in WHOLE_BLOCKS_ONLY:
                continue
            over = {k: v for k, v in CONFIGS[n].items() if k != "steps"}
            settings = GenerationSettings(steps=passes, stability_threshold=0, confidence_threshold=1e-30, **over)
            width = SHORT_SPEED_TOKENS if settings.short_canvas else C
            times = []
            for repeat in range(1 + SPEED_REPEATS):  # the first run warms up
                canvas = initial_canvas((1, width), V, mx.random.key(repeat), pinned=pins)
                start = time.perf_counter()
                last = None
                for last in refine_block(model, cache, canvas, settings=settings, key=mx.random.key(seed), pinned=pins):
                    pass
                times.append(time.perf_counter() - start)
            rows.append({"config": n, "pinned": fraction, "passes": int(last.passes[0]), "canvas": width,
                         "ms_per_pass": 1000 * statistics.median(times[1:]) / int(last.passes[0]),
                         "ms_per_pass_runs": [1000 * t / int(last.passes[0]) for t in times[1:]]})
            print(f"speed: {n}, {fraction:.0%} pinned: {rows[-1]['ms_per_pass']:.0f} ms/pass", file=sys.stderr, flush=True)
    return rows


def verdict(value: float, err: float, ref: float, ref_err: float) -> str:
    delta = value - ref
    noise = 2 * math.sqrt(err**2 + ref_err**2)
    return f"{delta:+.1%} ({'within noise' if abs(delta) <= noise else 'worse' if delta < 0 else 'better'})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--sudoku-model", default="sudoku")
    p.add_argument("--code-model", default="pycode")
    p.add_argument("--code-work", type=Path, default=ROOT / "recipes" / "code" / "work")
    p.add_argument("--givens", default="45,35")
    p.add_argument("--puzzles", type=int, default=200, help="held-out puzzles per band (0: no Sudoku)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--lines", type=int, default=50, help="held-out lines to infill (0: none)")
    p.add_argument("--functions", type=int, default=20, help="held-out function bodies to complete (0: none)")
    p.add_argument("--continuations", type=int, default=0, help="short answers after held-out lines' context (0: none)")
    p.add_argument("--continuation-tokens", type=int, default=16, help="tokens per short answer")
    p.add_argument("--speed-passes", type=int, default=0,
                   help="also time this many passes per config on a random model with the real vocabulary (0: no)")
    p.add_argument("--speed-pinned", default="0", help="fractions of the canvas pinned in the speed runs (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="JSON result (default benchmarks/results/fast-sampling-<time>.json)")
    p.add_argument("--no-preload", action="store_true", help="do not re-run with OpenBLAS preloaded (Linux)")
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import names_from

    names = names_from(a.configs, CONFIGS, "configuration")
    try:
        pinned = tuple(float(f) for f in a.speed_pinned.split(",") if f.strip())
    except ValueError:
        sys.exit(f"error: --speed-pinned takes fractions in [0, 1), e.g. 0,0.75 (got '{a.speed_pinned}')")
    if not pinned or any(not 0 <= f < 1 for f in pinned):
        sys.exit(f"error: --speed-pinned takes fractions in [0, 1), e.g. 0,0.75 (got '{a.speed_pinned}')")

    from probe import maybe_reexec_with_openblas

    maybe_reexec_with_openblas(a, lambda message: print(message, file=sys.stderr))
    from dgemma_mlx import load

    result = {"configs": {n: CONFIGS[n] for n in names}, "seed": a.seed, "sudoku": {}, "code": {}}
    if a.puzzles:
        model, tok = load(a.sudoku_model)
        givens = [int(g) for g in a.givens.split(",")]
        for n in names:
            if n in WHOLE_BLOCKS_ONLY:
                continue
            print(f"sudoku: {n}...", file=sys.stderr, flush=True)
            result["sudoku"][n] = sudoku_rows(model, tok, givens, a.puzzles, a.batch_size, CONFIGS[n], a.seed)
    if a.lines or a.functions or a.continuations:
        if not (a.code_work / "manifest.json").is_file():
            sys.exit(f"error: {a.code_work} has no prepared data (run recipes/code/prepare.py first)")
        model, tok = load(a.code_model)
        for n in names:
            print(f"code: {n}...", file=sys.stderr, flush=True)
            whole = n not in WHOLE_BLOCKS_ONLY
            result["code"][n] = code_rows(model, tok, a.code_work, a.lines if whole else 0, a.functions if whole else 0,
                                          CONFIGS[n], a.seed, a.continuations, a.continuation_tokens)

    if a.speed_passes:
        result["speed"] = {"shape": SPEED_SHAPE, "prompt": 256,
                           "rows": speed_rows(names, a.speed_passes, 256, a.seed, pinned)}
    out = a.out or ROOT / "benchmarks" / "results" / f"fast-sampling-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result, names))
    print(f"\nJSON: {out}", file=sys.stderr)


def table(result: dict, names: list[str]) -> str:
    lines = []
    if result["sudoku"]:
        lines += ["| config | givens | exact solve | vs reference | cell accuracy | mean passes | ms/puzzle |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        ref = {r["givens"]: r for r in result["sudoku"].get("reference", [])}
        for n in names:
            for r in result["sudoku"].get(n, []):  # short-canvas runs no Sudoku
                b = ref.get(r["givens"])
                vs = verdict(r["exact_solve_rate"], r["stderr"], b["exact_solve_rate"], b["stderr"]) if b and n != "reference" else ""
                lines.append(f"| {n} | {r['givens']} | {r['exact_solve_rate']:.1%} ± {r['stderr']:.1%} | {vs} | "
                             f"{r['cell_accuracy']:.1%} | {r['mean_passes']:.1f} | {r['ms_per_puzzle']:.0f} |")
    if any("continuation" in c for c in result["code"].values()):
        lines += ["", "| config | short answers: token accuracy | vs reference | first line exact | passes | ms/answer |",
                  "| --- | --- | --- | --- | --- | --- |"]
        ref = result["code"].get("reference", {}).get("continuation")
        for n in names:
            c = result["code"].get(n, {}).get("continuation")
            if not c:
                continue
            vs = verdict(c["token_accuracy"], c["stderr"], ref["token_accuracy"], ref["stderr"]) if ref and n != "reference" else ""
            lines.append(f"| {n} | {c['token_accuracy']:.1%} ± {c['stderr']:.1%} | {vs} | {c['line_exact']:.1%} | "
                         f"{c['mean_passes']:.1f} | {c['ms_per_answer']:.0f} |")
    if any("infill" in c or "completion" in c for c in result["code"].values()):
        lines += ["", "| config | infill exact | vs reference | infill passes | parse | vs reference | passes/block | "
                  "tok/pass | ms/block |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        ref = result["code"].get("reference", {}).get("infill")
        ref_m = result["code"].get("reference", {}).get("completion")
        for n in names:
            c = result["code"].get(n, {})
            i, m = c.get("infill", {}), c.get("completion", {})
            if not (i or m):
                continue
            vs = verdict(i["exact_match"], i["stderr"], ref["exact_match"], ref["stderr"]) if i and ref and n != "reference" else ""
            vs_m = (verdict(m["parse_rate"], m["stderr"], ref_m["parse_rate"], ref_m["stderr"])
                    if m and ref_m and n != "reference" else "")
            parse = f"{m['parse_rate']:.0%} ± {m['stderr']:.0%}" if m else "nan"
            lines.append(
                f"| {n} | {i.get('exact_match', float('nan')):.1%} | {vs} | {i.get('mean_passes', float('nan')):.1f} | "
                f"{parse} | {vs_m} | {m.get('passes_per_block', float('nan')):.1f} | "
                f"{m.get('tokens_per_pass', float('nan')):.2f} | {m.get('ms_per_block', float('nan')):.0f} |")
    if result.get("speed"):
        rows = result["speed"]["rows"]
        base = {r.get("pinned", 0.0): r["ms_per_pass"] for r in rows if r["config"] == "reference"}
        lines += ["", "| config | pinned | canvas | ms per pass (vocab 262144 shape) | vs reference |",
                  "| --- | --- | --- | --- | --- |"]
        for r in rows:
            b = base.get(r.get("pinned", 0.0))
            lines.append(f"| {r['config']} | {r.get('pinned', 0.0):.0%} | {r.get('canvas', 256)} | {r['ms_per_pass']:.0f} | "
                         + (f"{r['ms_per_pass'] / b:.2f}x |" if b else "|"))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
