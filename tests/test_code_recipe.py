"""The code recipe's evaluation (``recipes/code/evaluate.py``): the causal-head yardstick writes a
function body left to right, reproducibly per seed, and ends it where the function ends; the token
yardstick scores each true body token as each head predicts it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dgemma_mlx.bundled import MODELS_DIR, bundled_path

sys.path.insert(0, str(Path(__file__).parents[1] / "recipes" / "code"))
import evaluate as code_eval  # noqa: E402

SOURCE = 'import os\n\n\ndef join_all(parts):\n    """Join the parts into one path."""\n    return os.path.join(*parts)\n'


@pytest.fixture(scope="module")
def pycode():
    if bundled_path("pycode") is None:
        pytest.skip(f"the bundled model 'pycode' is not in {MODELS_DIR / 'pycode'}")
    from dgemma_mlx import load

    return load("pycode")


def function() -> "code_eval.Function":
    lines = SOURCE.splitlines(keepends=True)
    return code_eval.Function("example.py", lines, start=3, header_end=5, end=6, indent=0)


def test_function_end_is_the_first_complete_line_back_at_the_def_indent():
    assert code_eval.function_end("    x = 1\n\ndef g():\n", 0) == len("    x = 1\n\n")
    assert code_eval.function_end("    x = 1\n    retu", 0) is None
    assert code_eval.function_end("    x = 1\ndef", 0) is None  # an unfinished line is not an end yet


def test_causal_completion_is_reproducible_per_seed_and_stays_inside_the_function(pycode):
    model, tok = pycode
    f = function()
    runs = [code_eval.complete_causal(model, tok, f, seed=s, context_tokens=64, max_tokens=48, temperature=0.6)
            for s in (7, 7, 8)]
    assert runs[0] == runs[1]
    for r in runs:
        assert r["file"] == "example.py" and r["line"] == 4
        assert 0 < r["tokens"] <= 48
        if r["ended"]:
            assert code_eval.function_end(r["body"], f.indent) is None  # cut before the function's end
            assert r["parses"] == bool(code_eval.statements(f.header, r["body"]))
        else:
            assert r["statements"] is None and not r["parses"]


def test_token_losses_score_each_body_token_as_the_heads_predict_it(pycode):
    import mlx.core as mx

    model, tok = pycode
    f = function()
    got = code_eval.token_losses(model, tok, f, seed=3, context_tokens=64)
    prompt = list(tok.encode(code_eval.context(f.lines, f.start, tok, 64) + f.header))
    body = list(tok.encode(f.body, add_special_tokens=False))
    assert all(len(v) == len(body) for v in got.values()) and all(x > 0 for v in got.values() for x in v)
    # The causal head's figure for each token: one step of left-to-right decoding after its left context.
    cache = model.make_cache()
    model.encode(mx.array([prompt[:-1]]), cache)
    for i, last in enumerate([prompt[-1]] + body[:2]):
        logits = model.logits(model.encoder_pass(mx.array([[last]]), cache.layers, cache.offset))[0, -1]
        cache.advance(1)
        expected = (mx.logsumexp(logits) - logits[body[i]]).item()
        assert got["causal"][i] == pytest.approx(expected, abs=1e-3)
    # The denoiser's: a noisy token with every other canvas token clean is easier than one after
    # which the whole canvas is noise (on average over the body).
    assert sum(got["one"]) < sum(got["left"])
    assert code_eval.token_losses(model, tok, f, seed=3, context_tokens=64) == got
