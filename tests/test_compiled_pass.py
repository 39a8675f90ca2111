"""The fused kernels' compiled pass (dgemma_mlx/compiled_pass.py), run on the CPU.

With the fused kernels a block's passes after the first run as one ``mx.compile`` graph. It must
make the eager fused path's decisions (canvases, acceptances, stops), give its logits and
entropies to float rounding, leave the cache alone, trace once per block, and stay off where it
does not apply (the CPU kernels, ``freeze_accepted``, the switch off).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from dgemma_mlx import ops
from dgemma_mlx.compiled_pass import CompiledPass
from dgemma_mlx.generate import build_prompt, default_settings, stream_generate
from dgemma_mlx.events import PassEvent
from dgemma_mlx.refine import initial_canvas, refine_block


@pytest.fixture(autouse=True)
def fused():
    ops.set_kernels("fused")
    yield
    ops.set_kernels("auto")
    ops.set_compiled_passes(True)


@pytest.fixture
def prompt(tokenizer):
    return build_prompt(tokenizer, "Why is the sky blue?")


def run_block(model, prompt, *, compiled: bool, B: int = 1, pinned=None, seed: int = 3, **settings):
    """Every pass of one block, with the compiled passes on or off."""
    ops.set_compiled_passes(compiled)
    C, V = model.args.canvas_length, model.args.vocab_size
    cache = model.make_cache()
    model.encode(mx.array(prompt)[None], cache)
    keys = mx.random.split(mx.random.key(seed), B)
    canvas = initial_canvas((B, C), V, mx.random.key(seed + 1), pinned=pinned)
    s = default_settings(model).update(**settings)
    return list(refine_block(model, cache, canvas, settings=s, key=keys, pinned=pinned, score=True))


def assert_same_passes(eager, compiled):
    assert len(eager) == len(compiled)
    for e, c in zip(eager, compiled):
        assert np.array_equal(np.array(e.argmax), np.array(c.argmax))
        assert np.array_equal(np.array(e.accepted), np.array(c.accepted))
        assert np.array_equal(e.stopped, c.stopped) and np.array_equal(e.passes, c.passes)
        assert np.allclose(np.array(e.entropy), np.array(c.entropy), atol=1e-5)
        assert np.allclose(np.array(e.mean_entropy), np.array(c.mean_entropy), atol=1e-5)
        assert np.allclose(np.array(e.logprob), np.array(c.logprob), atol=1e-5)


def test_compiled_passes_make_the_eager_fused_paths_decisions(model, prompt):
    settings = dict(steps=8, entropy_bound=2.0)
    assert_same_passes(run_block(model, prompt, compiled=False, **settings),
                       run_block(model, prompt, compiled=True, **settings))


def test_compiled_passes_with_pins_and_a_batch_whose_rows_stop_at_different_passes(model, prompt):
    C = model.args.canvas_length
    pinned = np.full((3, C), -1, np.int32)
    pinned[0, ::3] = 200
    pinned[1, :] = 201  # nothing free: stops at once and leaves the batch
    pinned[2, 1::4] = 202
    settings = dict(steps=7, entropy_bound=2.0, stability_threshold=0, confidence_threshold=2.5)
    eager = run_block(model, prompt, compiled=False, B=3, pinned=mx.array(pinned), **settings)
    compiled = run_block(model, prompt, compiled=True, B=3, pinned=mx.array(pinned), **settings)
    assert len(set(eager[-1].passes.tolist())) > 1  # rows did leave the batch
    assert_same_passes(eager, compiled)


def test_compiled_passes_with_top_k_sampling(model, prompt):
    settings = dict(steps=6, top_k=16, entropy_bound=2.0)
    assert_same_passes(run_block(model, prompt, compiled=False, **settings),
                       run_block(model, prompt, compiled=True, **settings))


def test_compiled_passes_keep_whole_generations_unchanged(model, tokenizer, prompt):
    def tokens(compiled):
        ops.set_compiled_passes(compiled)
        events = list(stream_generate(model, tokenizer, prompt, steps=6, max_new_tokens=40, seed=11))
        return events[-1].tokens, [(e.canvas, e.accepted) for e in events if isinstance(e, PassEvent)]

    assert tokens(False) == tokens(True)


def test_the_model_is_traced_once_per_block_and_each_later_pass_replays_it(model, prompt, monkeypatch):
    calls = []
    original = model.denoise
    monkeypatch.setattr(model, "denoise", lambda c, *a, **kw: (calls.append(c.shape[0]), original(c, *a, **kw))[1])
    passes = run_block(model, prompt, compiled=True, steps=6, stability_threshold=3, confidence_threshold=1e-9)
    assert len(passes) == 6
    assert len(calls) == 2  # the eager first pass, then one trace for passes 2..6


def test_a_compiled_pass_reads_the_prefix_cache_without_changing_it(model, prompt):
    ops.set_compiled_passes(True)
    C, V = model.args.canvas_length, model.args.vocab_size
    cache = model.make_cache()
    model.encode(mx.array(prompt)[None], cache)
    before = [np.array(a) for a in cache.arrays()]
    offset = cache.offset
    list(refine_block(model, cache, initial_canvas((1, C), V, mx.random.key(0)),
                      settings=default_settings(model).update(steps=4), key=mx.random.key(1)))
    assert cache.offset == offset
    after = [np.array(a) for a in cache.arrays()]
    # The full-attention buffers' room past the prefix may hold anything; the prefix must not move.
    for layer, a, b in zip(cache.layers, before[::2], after[::2]):
        n = getattr(layer, "offset", a.shape[2])
        assert np.array_equal(a[..., :n, :], b[..., :n, :])


def test_compiled_passes_are_off_with_the_cpu_kernels_freezing_or_the_switch(model, prompt, monkeypatch):
    made = []
    original = CompiledPass.__init__
    monkeypatch.setattr(CompiledPass, "__init__", lambda self, *a, **kw: (made.append(1), original(self, *a, **kw))[1])
    run_block(model, prompt, compiled=True, steps=3)
    assert made == [1]
    run_block(model, prompt, compiled=False, steps=3)
    run_block(model, prompt, compiled=True, steps=3, freeze_accepted=True)
    ops.set_kernels("cpu")
    run_block(model, prompt, compiled=True, steps=3)
    assert made == [1]


def test_a_half_precision_model_self_conditions_from_logits_in_the_compiled_pass(checkpoint, prompt, monkeypatch):
    from dgemma_mlx import load

    made = []
    original = CompiledPass.__init__
    monkeypatch.setattr(CompiledPass, "__init__", lambda self, *a, **kw: (made.append(self), original(self, *a, **kw))[1])
    half, _ = load(checkpoint, dtype="bfloat16")
    for layer in half.layers:
        layer.experts.strategy = "dense"  # MLX's CPU gathered matmul takes float32 only
    eager = run_block(half, prompt, compiled=False, steps=5, entropy_bound=2.0)
    compiled = run_block(half, prompt, compiled=True, steps=5, entropy_bound=2.0)
    assert len(made) == 1 and not made[0].use_probs
    for e, c in zip(eager, compiled):
        # bfloat16 rounding may differ once elementwise ops fuse: the argmax agrees almost everywhere
        assert (np.array(e.argmax) == np.array(c.argmax)).mean() > 0.95
        assert np.allclose(np.array(e.entropy), np.array(c.entropy), atol=0.05)


def test_a_model_whose_experts_wait_for_the_host_runs_its_passes_eagerly(model, prompt, monkeypatch):
    made = []
    monkeypatch.setattr(CompiledPass, "__init__", lambda self, *a, **kw: made.append(1))
    for layer in model.layers:
        monkeypatch.setattr(layer.experts, "strategy", "grouped")
    assert model.host_syncs
    assert len(run_block(model, prompt, compiled=True, steps=3, confidence_threshold=1e-9)) == 3
    assert not made


def test_a_4_bit_model_runs_its_gathered_quantized_experts_inside_the_compiled_pass(checkpoint, prompt, tmp_path,
                                                                                   monkeypatch):
    from dgemma_mlx import load
    from dgemma_mlx.convert import convert

    made = []
    original = CompiledPass.__init__
    monkeypatch.setattr(CompiledPass, "__init__", lambda self, *a, **kw: (made.append(1), original(self, *a, **kw))[1])
    quantized, _ = load(convert(checkpoint, tmp_path / "q4", quantize=True, q_bits=4, q_group_size=32))
    assert quantized.layers[0].experts.quantized and not quantized.host_syncs
    settings = dict(steps=6, entropy_bound=2.0)
    eager = run_block(quantized, prompt, compiled=False, **settings)
    assert_same_passes(eager, run_block(quantized, prompt, compiled=True, **settings))
    assert made == [1]
