"""Evaluate a code model on the recipe's held-out files.

    python recipes/code/evaluate.py --model /work/runs/code --limit 100 --out code-eval.json

Metrics (each on ``--limit`` items drawn with ``--seed`` from the held-out files in
``WORK/manifest.json``; generation seeds are ``--seed + item``):

* loss: the block-diffusion loss per canvas token on ``WORK/data/test.jsonl`` with fixed draws
  (:meth:`dgemma_mlx.train.Trainer.evaluate`), and the encoder's causal-LM loss per token;
* completion: prompt = the source before a held-out function (whole lines, at most
  ``--context-tokens``) + its ``def`` header and docstring, raw (no chat template); generation runs
  until the function ends (a line indented no deeper than the ``def``) or EOS; the share of
  functions whose header + generated body ``ast.parse`` with at least one statement in the body
  besides the docstring (an empty or comment-only body parses after a docstring, but is not a
  body). A body still going at ``--max-body-tokens`` counts as not parsing;
* sampler: passes per block, the share of blocks the adaptive stop ended before the pass limit,
  and tokens per pass (generated tokens, EOS included, per denoising pass) of those completions;
* infill: a single line inside a held-out function becomes a hole (``<|fill:N|>`` with N its
  token count, and ``<|fill|>`` of ``--fill-length``); exact match of the stripped line. The
  following lines of the function that fit in the hole's block stay pinned after it;
* edit: the same lines rewritten in place with :func:`dgemma_mlx.infill.edit`, warm-started from
  the current line vs from noise: passes until the block stopped, and the share of lines kept;
* causal (not run by default): the completion's functions, their bodies sampled left to right from
  the encoder's causal head at ``--causal-temperature``: what the same weights write one token at a
  time, the yardstick for the denoiser, which writes many at once;
* tokens (not run by default): the completion's functions, the first canvas of each true body
  scored token by token (cross-entropy, nats): by the causal head from the prompt and the body's
  earlier tokens; by the denoiser with the body's earlier tokens clean on the canvas and the rest
  uniform noise ("left"); and by the denoiser with every other canvas token clean ("one"). The
  denoiser's figures are of a second pass self-conditioned on the first pass's logits (as every
  sampler pass after the first is). A cheaper, less noisy yardstick of the denoiser than sampling.

``--t-max``, ``--t-min``, ``--entropy-bound`` and ``--steps`` override the checkpoint's sampler
settings (``generation_config.json``) for every metric that samples.

Prints a markdown table on stdout, progress on stderr, and writes the JSON (``--out``).
"""

from __future__ import annotations

import argparse
import ast
import json
import random
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from statistics import mean
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import Progress, markdown_table, script, write_json  # noqa: E402

WORK = Path(__file__).parent / "work"


@dataclass
class Function:
    """A held-out function: ``lines`` of its file (with line ends), the 0-based line index of its
    ``def``, where its header (signature and docstring) ends and where it ends; ``indent`` is the
    ``def`` line's indentation."""

    file: str
    lines: list[str]
    start: int
    header_end: int
    end: int
    indent: int

    @property
    def header(self) -> str:
        return "".join(self.lines[self.start : self.header_end])

    @property
    def body(self) -> str:
        return "".join(self.lines[self.header_end : self.end])


def held_out_functions(work: Path) -> list[Function]:
    """Every function (and method) with a body below its header in the held-out files."""
    from dgemma_mlx.errors import DGemmaError

    try:
        manifest = json.loads((work / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise DGemmaError(f"{work}/manifest.json: cannot read the held-out file list ({e})")
    root = Path(manifest["stdlib"])
    out = []
    for rel in manifest["test"]["files"]:
        try:
            source = (root / rel).read_text(encoding="utf-8")
            tree = ast.parse(source)
        except (OSError, SyntaxError, UnicodeDecodeError) as e:
            raise DGemmaError(f"{root / rel}: cannot read the held-out file ({e})")
        lines = source.splitlines(keepends=True)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            body = node.body
            doc = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str)
            if doc:
                if len(body) == 1:
                    continue
                header_end = body[0].end_lineno
            else:
                header_end = body[0].lineno - 1
            if header_end < node.lineno:  # body on the def line
                continue
            def_line = lines[node.lineno - 1]
            f = Function(rel, lines, node.lineno - 1, header_end, node.end_lineno,
                         len(def_line) - len(def_line.lstrip()))
            if parses(f.header, f.body):
                out.append(f)
    return out


def parses(header: str, body: str) -> bool:
    try:
        ast.parse(textwrap.dedent(header + body))
        return True
    except (SyntaxError, ValueError):
        return False


def statements(header: str, body: str) -> Optional[int]:
    """Statements the function's body has beyond its docstring, None when ``header + body`` does
    not parse: a generated body of only blank lines or comments parses after a docstring header,
    but it is no body."""
    try:
        tree = ast.parse(textwrap.dedent(header + body))
    except (SyntaxError, ValueError):
        return None
    fn = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if fn is None:
        return 0
    rest = fn.body
    if rest and isinstance(rest[0], ast.Expr) and isinstance(getattr(rest[0], "value", None), ast.Constant) \
            and isinstance(rest[0].value.value, str):
        rest = rest[1:]
    return len(rest)


def context(lines: list[str], upto: int, tokenizer, budget: int) -> str:
    """The whole lines before index ``upto`` that fit in ``budget`` tokens."""
    out, used = [], 0
    for line in reversed(lines[:upto]):
        n = len(tokenizer.encode(line, add_special_tokens=False))
        if used + n > budget:
            break
        out.append(line)
        used += n
    return "".join(reversed(out))


def function_end(text: str, indent: int) -> Optional[int]:
    """Where generated body ``text`` leaves the function: the offset of the first complete line
    that is not blank and indented no deeper than the ``def`` (None while still inside)."""
    pos = 0
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            return None
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            return pos
        pos += len(line)
    return None


# ------------------------------------------------------------------------------------ metrics
def loss_metrics(model, tokenizer, work: Path, batches: Optional[int], seed: int) -> dict:
    import tempfile

    from dgemma_mlx.train import Trainer, TrainingArgs
    from dgemma_mlx.train.data import Formatter, load_split

    test = load_split(work / "data" / "test.jsonl", Formatter(tokenizer, model.args.eos_token_ids), 256)
    args = TrainingArgs(fine_tune_type="full", batch_size=8, encoder_loss_weight=1.0, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, tokenizer, {"train": test}, args, Path(tmp))
        total, diffusion, encoder = trainer.evaluate(test, batches)
    n = len(test) if batches is None else min(len(test), batches * args.batch_size)
    return {"rows": n, "diffusion_loss": diffusion, "encoder_loss": encoder, "loss": total}


def complete(model, tokenizer, f: Function, *, seed: int, context_tokens: int, max_tokens: int, **settings) -> dict:
    """Generate ``f``'s body after its header; whether it ended and parses, and each block's
    passes and tokens (``settings``: generation settings over the checkpoint's)."""
    from dgemma_mlx.events import CommitEvent
    from dgemma_mlx.generate import stream_generate

    prompt = context(f.lines, f.start, tokenizer, context_tokens) + f.header
    text, blocks, ended = "", [], False
    for ev in stream_generate(model, tokenizer, prompt, seed=seed, max_new_tokens=max_tokens, **settings):
        if not isinstance(ev, CommitEvent):
            continue
        blocks.append({"passes": ev.steps, "tokens": len(ev.tokens) + ev.eos})
        text += ev.text
        cut = function_end(text, f.indent)
        if cut is not None:
            text, ended = text[:cut], True
            break
        if ev.eos:
            ended = True
    return {**body_result(f, text, ended), "blocks": blocks}


def body_result(f: Function, text: str, ended: bool) -> dict:
    """What the completion metrics record of a generated body ``text`` of ``f``: it parses when it
    ended and has at least one statement beyond the docstring."""
    n = statements(f.header, text) if ended else None
    return {"file": f.file, "line": f.start + 1, "ended": ended, "statements": n,
            "parses": bool(n), "empty": n == 0, "body": text}


def complete_causal(model, tokenizer, f: Function, *, seed: int, context_tokens: int, max_tokens: int,
                    temperature: float) -> dict:
    """``f``'s body sampled left to right from the encoder's causal head (the training's second
    loss) at ``temperature``, with the same prompt and ending rules as :func:`complete`: what the
    same weights write one token at a time, a yardstick for the denoiser's parallel writing."""
    import mlx.core as mx

    ids = list(tokenizer.encode(context(f.lines, f.start, tokenizer, context_tokens) + f.header))
    eos = set(model.args.eos_token_ids)
    cache = model.make_cache()
    model.encode(mx.array(ids[:-1])[None], cache)
    key, last, out, text, ended = mx.random.key(seed), ids[-1], [], "", False
    for _ in range(max_tokens):
        h = model.encoder_pass(mx.array([[last]]), cache.layers, cache.offset)
        cache.advance(1)
        logits = model.logits(h)[0, -1]
        key, sub = mx.random.split(key)
        last = int(mx.random.categorical(logits / temperature, key=sub))
        if last in eos:
            ended = True
            break
        out.append(last)
        text = tokenizer.decode(out)
        cut = function_end(text, f.indent)
        if cut is not None:
            text, ended = text[:cut], True
            break
    return {**body_result(f, text, ended), "tokens": len(out)}


def token_losses(model, tokenizer, f: Function, *, seed: int, context_tokens: int) -> dict:
    """Cross-entropy (nats) of each of the first ``canvas_length`` tokens of ``f``'s true body under
    the causal head and under the denoiser in two canvases (see the module docstring: ``left``,
    ``one``); lists of per-token values."""
    import mlx.core as mx
    import numpy as np
    from mlx.nn.losses import cross_entropy

    C, V = model.args.canvas_length, model.args.vocab_size
    prompt = list(tokenizer.encode(context(f.lines, f.start, tokenizer, context_tokens) + f.header))
    body = list(tokenizer.encode(f.body, add_special_tokens=False))[:C]
    n = len(body)
    if not n:
        return {"causal": [], "left": [], "one": []}
    target = mx.array(body)

    def ce(logits: mx.array) -> list[float]:  # [n, V] -> n values
        return cross_entropy(logits, target).tolist()

    cache = model.make_cache()
    causal = model.logits(model.encoder_pass(mx.array([prompt + body]), cache.layers, 0))[0, len(prompt) - 1 : -1]
    cache = model.make_cache()
    model.encode(mx.array([prompt]), cache)
    rng = np.random.default_rng(seed)
    clean = np.array(body + [model.args.eos_token_ids[0]] * (C - n))
    rows = np.arange(n)
    left = np.where(np.arange(C)[None] < rows[:, None], clean[None], rng.integers(0, V, (n, C)))
    one = np.repeat(clean[None], n, axis=0)
    one[rows, rows] = rng.integers(0, V, n)
    out = {"causal": ce(causal)}
    for name, canvas in (("left", left), ("one", one)):
        canvas = mx.array(canvas)
        first = model.denoise(canvas, cache)  # every position: the self-conditioning signal
        out[name] = ce(model.denoise(canvas, cache, first, positions=mx.array(rows)[:, None])[:, 0])  # row i: token i
    return out


def infill_items(functions: list[Function], tokenizer, n: int, rng: random.Random) -> list[tuple[Function, int]]:
    """``n`` (function, line index) pairs: non-blank, non-comment body lines."""
    pool = [(f, i) for f in functions for i in range(f.header_end, f.end)
            if len(f.lines[i].strip()) >= 4 and not f.lines[i].lstrip().startswith("#") and "<|fill" not in f.lines[i]]
    rng.shuffle(pool)
    return pool[:n]


def window(f: Function, i: int, tokenizer, context_tokens: int, after_tokens: int) -> tuple[str, str, str]:
    """(text before line ``i``, line ``i`` without its line end, the text after it): the context
    before within ``context_tokens``, and the function's following lines within ``after_tokens``."""
    before = context(f.lines, i, tokenizer, context_tokens)
    after, used = "", 0
    for line in f.lines[i + 1 : f.end]:
        n = len(tokenizer.encode(line, add_special_tokens=False))
        if used + n > after_tokens:
            break
        after += line
        used += n
    line = f.lines[i]
    body = line.rstrip("\r\n")
    return before, body, line[len(body) :] + after


def infill_line(model, tokenizer, f: Function, i: int, *, seed: int, context_tokens: int, fill_length: int,
                **settings) -> dict:
    from dgemma_mlx.infill import infill

    C = model.args.canvas_length
    true_len = len(tokenizer.encode(f.lines[i].strip(), add_special_tokens=False))
    before, line, after = window(f, i, tokenizer, context_tokens, max(C - max(true_len, fill_length) - 2, 0))
    indent = line[: len(line) - len(line.lstrip())]
    target = line.strip()
    out = {"file": f.file, "line": i + 1, "target": target, "tokens": true_len}
    for name, hole, n in (("true_length", f"<|fill:{true_len}|>", true_len), ("default_length", "<|fill|>", fill_length)):
        end = infill(model, tokenizer, before + indent + hole + after, fill_length=n, seed=seed, **settings)
        out[name] = {"fill": end.fills[0], "exact": end.fills[0].strip() == target, "passes": end.stats.steps}
    return out


def edit_line(model, tokenizer, f: Function, i: int, *, seed: int, context_tokens: int, **settings) -> dict:
    from dgemma_mlx.infill import edit

    C = model.args.canvas_length
    n = len(tokenizer.encode(f.lines[i].rstrip("\r\n"), add_special_tokens=False))
    before, line, after = window(f, i, tokenizer, context_tokens, max(C - n - 2, 0))
    text = before + line + after
    number = before.count("\n") + 1
    out = {"file": f.file, "line": i + 1}
    for name, warm in (("warm", True), ("cold", False)):
        end = edit(model, tokenizer, text, (number, number), warm=warm, seed=seed, **settings)
        kept = end.text.splitlines()[number - 1] == line if end.text.count("\n") >= number - 1 else False
        out[name] = {"passes": end.stats.steps, "kept": kept}
    return out


def sampler_metrics(completions: list[dict], max_steps: int) -> dict:
    blocks = [b for c in completions for b in c["blocks"]]
    if not blocks:
        return {}
    passes = sum(b["passes"] for b in blocks)
    return {
        "blocks": len(blocks),
        "max_passes": max_steps,
        "mean_passes_per_block": passes / len(blocks),
        "stopped_before_limit": sum(b["passes"] < max_steps for b in blocks) / len(blocks),
        "tokens_per_pass": sum(b["tokens"] for b in blocks) / passes,
    }


# -------------------------------------------------------------------------------------- main
@script
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default="pycode", help="checkpoint directory or bundled model name")
    p.add_argument("--work", type=Path, default=WORK, help="the recipe's prepared data (manifest.json, data/)")
    p.add_argument("--limit", type=int, default=100, help="items per metric (default 100)")
    p.add_argument("--loss-batches", type=int, default=None, help="test batches of 8 rows for the loss (default all)")
    p.add_argument("--metrics", default="loss,completion,infill,edit",
                   help="which metrics to compute (also: causal, the completion sampled left to right "
                        "from the encoder's causal head; tokens, the true bodies scored by both heads)")
    p.add_argument("--causal-temperature", type=float, default=0.6, help="temperature of the causal metric")
    p.add_argument("--context-tokens", type=int, default=160, help="tokens of source before a function or line")
    p.add_argument("--max-body-tokens", type=int, default=192, help="generated tokens per function body at most")
    p.add_argument("--fill-length", type=int, default=None, help="tokens of the default-length hole (default: the library's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--t-max", type=float, help="sampler: first pass's temperature (default: the checkpoint's)")
    p.add_argument("--t-min", type=float, help="sampler: last pass's temperature (default: the checkpoint's)")
    p.add_argument("--entropy-bound", type=float, help="sampler: entropy bound (default: the checkpoint's)")
    p.add_argument("--steps", type=int, help="sampler: passes per block at most (default: the checkpoint's)")
    p.add_argument("--out", type=Path, help="JSON result file")
    a = p.parse_args()

    from dgemma_mlx import load
    from dgemma_mlx.errors import DGemmaError
    from dgemma_mlx.generate import default_settings
    from dgemma_mlx.infill import DEFAULT_FILL_LENGTH

    wanted = {m.strip() for m in a.metrics.split(",") if m.strip()}
    unknown = wanted - {"loss", "completion", "causal", "tokens", "infill", "edit"}
    if unknown or not wanted:
        raise DGemmaError(f"--metrics: unknown metric '{sorted(unknown)[0] if unknown else a.metrics}'")
    if a.limit <= 0:
        raise DGemmaError("--limit must be at least 1")
    if a.causal_temperature <= 0:
        raise DGemmaError("--causal-temperature must be positive")
    fill_length = a.fill_length or DEFAULT_FILL_LENGTH
    model, tokenizer = load(a.model)
    overrides = {k: v for k, v in (("t_max", a.t_max), ("t_min", a.t_min), ("entropy_bound", a.entropy_bound),
                                    ("steps", a.steps)) if v is not None}
    settings = default_settings(model).update(**overrides)
    settings.validate()
    result: dict = {"model": str(a.model), "seed": a.seed, "settings": settings.to_dict()}
    rows = []
    if "loss" in wanted:
        sys.stderr.write("loss on the test rows...\n")
        loss = result["loss"] = loss_metrics(model, tokenizer, a.work, a.loss_batches, a.seed)
        rows += [["test loss per canvas token (diffusion)", f"{loss['diffusion_loss']:.4f}", f"{loss['rows']} rows"],
                 ["test loss per token (encoder, causal LM)", f"{loss['encoder_loss']:.4f}", f"{loss['rows']} rows"]]
    functions = held_out_functions(a.work) if wanted - {"loss"} else []
    chosen = random.Random(a.seed).sample(functions, min(a.limit, len(functions)))  # completion and causal
    if "completion" in wanted:
        prog = Progress("completion", len(chosen))
        comps = []
        for k, f in enumerate(chosen):
            comps.append(complete(model, tokenizer, f, seed=a.seed + k, context_tokens=a.context_tokens,
                                  max_tokens=a.max_body_tokens, **overrides))
            prog.advance(note=f"{sum(c['parses'] for c in comps)} parse")
        s = result["sampler"] = sampler_metrics(comps, settings.steps)
        share = sum(c["parses"] for c in comps) / len(comps)
        result["completion"] = {"functions": len(comps), "parse_rate": share,
                                "ended_rate": sum(c["ended"] for c in comps) / len(comps),
                                "empty_rate": sum(c["empty"] for c in comps) / len(comps),
                                "items": comps}
        empty = result["completion"]["empty_rate"]
        rows += [["function bodies that parse", f"{share:.1%}", f"{len(comps)} functions; {empty:.0%} more ended with an empty body"],
                 ["passes per block (mean)", f"{s['mean_passes_per_block']:.1f}", f"limit {s['max_passes']}, {s['blocks']} blocks"],
                 ["blocks ended by the adaptive stop", f"{s['stopped_before_limit']:.1%}", "before the pass limit"],
                 ["tokens per pass", f"{s['tokens_per_pass']:.2f}", "EOS included"]]
    if "causal" in wanted:
        prog = Progress("causal", len(chosen))
        comps = []
        for k, f in enumerate(chosen):
            comps.append(complete_causal(model, tokenizer, f, seed=a.seed + k, context_tokens=a.context_tokens,
                                         max_tokens=a.max_body_tokens, temperature=a.causal_temperature))
            prog.advance(note=f"{sum(c['parses'] for c in comps)} parse")
        share = sum(c["parses"] for c in comps) / len(comps)
        result["causal"] = {"functions": len(comps), "temperature": a.causal_temperature, "parse_rate": share,
                            "empty_rate": sum(c["empty"] for c in comps) / len(comps), "items": comps}
        rows.append(["function bodies that parse, written by the causal head", f"{share:.1%}",
                     f"{len(comps)} functions, temperature {a.causal_temperature}"])
    if "tokens" in wanted:
        prog = Progress("tokens", len(chosen))
        per = {"causal": [], "left": [], "one": []}
        for k, f in enumerate(chosen):
            for name, values in token_losses(model, tokenizer, f, seed=a.seed + k, context_tokens=a.context_tokens).items():
                per[name] += values
            prog.advance()
        result["tokens"] = {"functions": len(chosen), "tokens": len(per["causal"]),
                            **{name: mean(v) for name, v in per.items()}}
        notes = {"causal": "the causal head, from the prompt and the body's earlier tokens",
                 "left": "the denoiser, earlier body tokens clean on the canvas, the rest noise",
                 "one": "the denoiser, every other canvas token clean"}
        rows += [[f"body token loss, {name}", f"{result['tokens'][name]:.3f}", f"{notes[name]}; {len(per[name])} tokens"]
                 for name in per]
    items = infill_items(functions, tokenizer, a.limit, random.Random(a.seed + 1)) if wanted & {"infill", "edit"} else []
    if "infill" in wanted:
        prog = Progress("infill", len(items))
        fills = []
        for k, (f, i) in enumerate(items):
            fills.append(infill_line(model, tokenizer, f, i, seed=a.seed + k, context_tokens=a.context_tokens,
                                     fill_length=fill_length, **overrides))
            prog.advance(note=f"{sum(x['true_length']['exact'] for x in fills)} exact")
        exact = {m: sum(x[m]["exact"] for x in fills) / len(fills) for m in ("true_length", "default_length")}
        result["infill"] = {"lines": len(fills), "fill_length": fill_length, "exact_match": exact, "items": fills}
        rows += [["single-line infill exact match (true length)", f"{exact['true_length']:.1%}", f"{len(fills)} lines"],
                 [f"single-line infill exact match (<|fill|> = {fill_length})", f"{exact['default_length']:.1%}", f"{len(fills)} lines"]]
    if "edit" in wanted:
        prog = Progress("edit", len(items))
        edits = []
        for k, (f, i) in enumerate(items):
            edits.append(edit_line(model, tokenizer, f, i, seed=a.seed + k, context_tokens=a.context_tokens,
                                   **overrides))
            prog.advance()
        summary = {m: {"mean_passes": mean(e[m]["passes"] for e in edits),
                       "kept_rate": sum(e[m]["kept"] for e in edits) / len(edits)} for m in ("warm", "cold")}
        result["edit"] = {"lines": len(edits), **summary, "items": edits}
        for m in ("warm", "cold"):
            rows.append([f"edit passes to converge ({m})", f"{summary[m]['mean_passes']:.1f}",
                         f"line unchanged in {summary[m]['kept_rate']:.0%} of {len(edits)}"])
    if a.out:
        write_json(a.out, result)
    print(markdown_table(["metric", "value", "note"], rows))


if __name__ == "__main__":
    main()
