"""The MLX model reproduces the transformers reference (float32): logits, cache contents, semantics."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers import DynamicCache

from dgemma_mlx.cache import FullAttentionCache, SlidingWindowCache

TOL = 1e-4


@pytest.fixture(autouse=True, params=["cpu", "fused"])
def kernels(request):
    """Every parity test runs on both attention/expert paths: the CPU techniques and the fused
    (GPU) path, selected on the CPU."""
    from dgemma_mlx.ops import set_kernels

    set_kernels(request.param)
    yield request.param
    set_kernels("auto")


def ref_encode(ref, blocks):
    cache = DynamicCache(config=ref.config.get_text_config(decoder=True))
    with torch.no_grad():
        for b in blocks:
            ref.model.encoder(input_ids=torch.tensor(b)[None], cache=cache)
    return cache


def ref_denoise(ref, cache, canvas, sc=None):
    with torch.no_grad():
        out = ref(
            decoder_input_ids=torch.tensor(canvas)[None],
            cache=cache,
            self_conditioning_logits=None if sc is None else torch.tensor(sc)[None],
        )
    return out.logits[0].numpy()


def our_encode(model, blocks, chunk_size=None):
    cache = model.make_cache()
    for b in blocks:
        model.encode(mx.array(b)[None], cache, chunk_size=chunk_size)
    return cache


def our_denoise(model, cache, canvas, sc=None):
    out = model.denoise(mx.array(canvas)[None], cache, None if sc is None else mx.array(sc)[None])
    return np.array(out[0])


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def random_case(rng, model, prompt_len):
    V, C = model.args.vocab_size, model.args.canvas_length
    prompt = rng.integers(0, V, prompt_len).tolist()
    canvas = rng.integers(0, V, C).tolist()
    sc = (rng.normal(size=(C, V)) * 4).astype(np.float32)
    return prompt, canvas, sc


@pytest.mark.parametrize("prompt_len", [1, 5, 21])
def test_denoise_logits_match_reference_without_self_conditioning(reference_model, model, rng, prompt_len):
    prompt, canvas, _ = random_case(rng, model, prompt_len)
    ref = ref_denoise(reference_model, ref_encode(reference_model, [prompt]), canvas)
    ours = our_denoise(model, our_encode(model, [prompt]), canvas)
    assert ours.shape == ref.shape == (model.args.canvas_length, model.args.vocab_size)
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("prompt_len", [3, 21])
def test_denoise_logits_match_reference_with_self_conditioning(reference_model, model, rng, prompt_len):
    prompt, canvas, sc = random_case(rng, model, prompt_len)
    ref = ref_denoise(reference_model, ref_encode(reference_model, [prompt]), canvas, sc)
    ours = our_denoise(model, our_encode(model, [prompt]), canvas, sc)
    assert np.abs(ours - ref).max() <= TOL


def test_prompt_longer_than_sliding_window_matches_reference(reference_model, model, rng):
    window = model.args.sliding_window
    prompt, canvas, sc = random_case(rng, model, 5 * window + 3)
    ref = ref_denoise(reference_model, ref_encode(reference_model, [prompt]), canvas, sc)
    ours = our_denoise(model, our_encode(model, [prompt]), canvas, sc)
    assert np.abs(ours - ref).max() <= TOL


def test_logits_after_two_committed_blocks_match_reference(reference_model, model, rng):
    C = model.args.canvas_length
    prompt, canvas, sc = random_case(rng, model, 11)
    blocks = [prompt] + [rng.integers(0, model.args.vocab_size, C).tolist() for _ in range(2)]
    ref = ref_denoise(reference_model, ref_encode(reference_model, blocks), canvas, sc)
    ours = our_denoise(model, our_encode(model, blocks), canvas, sc)
    assert np.abs(ours - ref).max() <= TOL


def test_cache_contents_match_reference_cache(reference_model, model, rng):
    C = model.args.canvas_length
    blocks = [rng.integers(0, model.args.vocab_size, 13).tolist()]
    blocks += [rng.integers(0, model.args.vocab_size, C).tolist() for _ in range(2)]
    ref_cache = ref_encode(reference_model, blocks)
    cache = our_encode(model, blocks)
    assert cache.offset == sum(len(b) for b in blocks) == ref_cache.get_seq_length()
    for i, (ours, theirs) in enumerate(zip(cache.layers, ref_cache.layers)):
        k, v = ours.prefix()
        assert k.shape == tuple(theirs.keys.shape), f"layer {i}"
        np.testing.assert_allclose(np.array(k), theirs.keys.numpy(), atol=TOL, err_msg=f"layer {i} keys")
        np.testing.assert_allclose(np.array(v), theirs.values.numpy(), atol=TOL, err_msg=f"layer {i} values")


def test_encoding_with_the_attention_softmax_on_the_host_fills_the_reference_cache(reference_model, model, rng,
                                                                                  kernels, monkeypatch):
    # Model.encode is inference only, so with the CPU kernels it runs under host math: here every
    # attention softmax of the tiny model takes the host pass, over a prompt longer than a window.
    from dgemma_mlx import attention, ops

    monkeypatch.setattr(ops, "HOST_MATH_MIN_SIZE", 1)
    calls = []
    real = attention.host_exp2_rows
    monkeypatch.setattr(attention, "host_exp2_rows", lambda s: calls.append(1) or real(s))
    blocks = [rng.integers(0, model.args.vocab_size, 2 * model.args.sliding_window + 3).tolist()]
    ref_cache = ref_encode(reference_model, blocks)
    cache = our_encode(model, blocks, chunk_size=7)
    assert bool(calls) == (kernels == "cpu")
    for i, (ours, theirs) in enumerate(zip(cache.layers, ref_cache.layers)):
        k, v = ours.prefix()
        np.testing.assert_allclose(np.array(k), theirs.keys.numpy(), atol=TOL, err_msg=f"layer {i} keys")
        np.testing.assert_allclose(np.array(v), theirs.values.numpy(), atol=TOL, err_msg=f"layer {i} values")


def test_sliding_layers_keep_window_minus_one_tokens_and_full_layers_keep_all(model, rng):
    window = model.args.sliding_window
    cache = our_encode(model, [rng.integers(0, model.args.vocab_size, 7 * window).tolist()])
    for c in cache.layers:
        k, _ = c.prefix()
        if isinstance(c, SlidingWindowCache):
            assert k.shape[2] == window - 1
        else:
            assert isinstance(c, FullAttentionCache)
            assert k.shape[2] == 7 * window


def test_sliding_layer_memory_does_not_grow_with_the_prompt(model, rng):
    sizes = []
    for n in (4 * model.args.sliding_window, 16 * model.args.sliding_window):
        cache = our_encode(model, [rng.integers(0, model.args.vocab_size, n).tolist()])
        sizes.append(sum(c.nbytes for c in cache.layers if isinstance(c, SlidingWindowCache)))
    assert sizes[0] == sizes[1]


def test_chunked_encode_equals_one_pass(model, rng):
    prompt, canvas, sc = random_case(rng, model, 45)
    one = our_denoise(model, our_encode(model, [prompt], chunk_size=1000), canvas, sc)
    for chunk in (1, 7, 16):
        chunked = our_denoise(model, our_encode(model, [prompt], chunk_size=chunk), canvas, sc)
        assert np.abs(one - chunked).max() <= 1e-5


def test_denoise_leaves_cache_unchanged_and_is_repeatable(model, rng):
    prompt, canvas, sc = random_case(rng, model, 19)
    cache = our_encode(model, [prompt])
    content = lambda: [np.array(a) for layer in cache.layers for a in layer.prefix()]
    before = content()
    offset = cache.offset
    first = our_denoise(model, cache, canvas, sc)
    second = our_denoise(model, cache, canvas, sc)
    assert np.array_equal(first, second)
    assert cache.offset == offset
    for a, b in zip(before, content()):
        assert np.array_equal(a, b)


def test_self_conditioning_probs_equal_self_conditioning_logits(model, rng):
    prompt, canvas, sc = random_case(rng, model, 9)
    cache = our_encode(model, [prompt])
    by_logits = model.denoise(mx.array(canvas)[None], cache, mx.array(sc)[None])
    by_probs = model.denoise(
        mx.array(canvas)[None], cache, self_conditioning_probs=mx.softmax(mx.array(sc)[None], axis=-1)
    )
    # the two softmaxes (ours from the logits, mx.softmax for the probs) agree to float32 rounding
    assert np.abs(np.array(by_logits) - np.array(by_probs)).max() <= 1e-5


def test_logits_are_float32_and_softcapped(model, rng):
    prompt, canvas, sc = random_case(rng, model, 4)
    logits = model.denoise(mx.array(canvas)[None], our_encode(model, [prompt]), mx.array(sc)[None])
    assert logits.dtype == mx.float32
    assert float(mx.abs(logits).max()) < model.args.final_logit_softcapping


@pytest.mark.parametrize("strategy", ["gather", "grouped"])
def test_expert_strategies_give_the_reference_logits(reference_model, model, rng, strategy):
    prompt, canvas, sc = random_case(rng, model, 12)
    ref = ref_denoise(reference_model, ref_encode(reference_model, [prompt]), canvas, sc)
    for layer in model.layers:
        layer.experts.strategy = strategy
    try:
        ours = our_denoise(model, our_encode(model, [prompt]), canvas, sc)
    finally:
        for layer in model.layers:
            layer.experts.strategy = "auto"
    assert np.abs(ours - ref).max() <= TOL


@pytest.mark.parametrize("strategy", ["gather", "grouped"])
def test_only_the_routed_experts_weights_are_used(model, rng, strategy):
    """Poisoning an expert no token is routed to must not change anything (no dense pass)."""
    layer = model.layers[0]
    x = mx.array(rng.normal(size=(6, model.args.hidden_size)).astype(np.float32))
    idx, w = layer.router(x)
    unused = sorted(set(range(model.args.num_experts)) - set(np.array(idx).flatten().tolist()))
    assert unused, "the test needs at least one expert that no token is routed to"
    experts = layer.experts
    experts.strategy = strategy
    saved = (experts.gate_up_proj.weight, experts.down_proj.weight)
    try:
        clean = np.array(experts(x, idx, w))
        poison = mx.ones_like(saved[0][0]) * float("nan")
        experts.gate_up_proj.weight = mx.concatenate(
            [poison[None] if e in unused else saved[0][e][None] for e in range(saved[0].shape[0])]
        )
        poisoned = np.array(experts(x, idx, w))
    finally:
        experts.gate_up_proj.weight, experts.down_proj.weight = saved
        experts.strategy = "auto"
    assert np.isfinite(poisoned).all()
    assert np.array_equal(clean, poisoned)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_model_runs_and_stays_close_to_float32(checkpoint, model, rng, dtype):
    from dgemma_mlx import load

    half, _ = load(checkpoint, dtype=dtype)
    prompt, canvas, sc = random_case(rng, model, 21)
    a = our_denoise(model, our_encode(model, [prompt]), canvas, sc)
    b = our_denoise(half, our_encode(half, [prompt]), canvas, sc)
    cosine = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert cosine.mean() > 0.9, cosine.mean()


def test_the_fused_path_runs_mlx_fused_attention_and_the_cpu_path_does_not(model, monkeypatch, kernels):
    import dgemma_mlx.attention as attention

    calls = []
    real = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(attention.mx.fast, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    cache = our_encode(model, [[2, 5, 7]])
    our_denoise(model, cache, list(range(model.args.canvas_length)))
    assert bool(calls) == (kernels == "fused")


def test_denoising_leaves_the_cache_content_unchanged(model, rng, kernels):
    """The fused path writes the canvas into a full-attention buffer's room past the prefix:
    the prefix, the offset and the next commit are as if no canvas had been denoised."""
    V, C = model.args.vocab_size, model.args.canvas_length
    prompt, block = rng.integers(4, V, 40).tolist(), rng.integers(4, V, C).tolist()
    touched, clean = our_encode(model, [prompt]), our_encode(model, [prompt])
    for _ in range(2):
        our_denoise(model, touched, rng.integers(4, V, C).tolist())
    model.encode(mx.array(block)[None], touched)
    model.encode(mx.array(block)[None], clean)
    assert touched.offset == clean.offset == len(prompt) + C
    for a, b in zip(touched.layers, clean.layers):
        ka, va = a.prefix()
        kb, vb = b.prefix()
        assert mx.array_equal(ka, kb) and mx.array_equal(va, vb)
    canvas = rng.integers(4, V, C).tolist()
    np.testing.assert_array_equal(our_denoise(model, touched, canvas), our_denoise(model, clean, canvas))
