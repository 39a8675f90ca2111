"""The CPU kernels' polynomial tanh, exp2 and gated GELU agree with the exact functions, in value
and gradient, and the compiled training step equals the plain one."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from dgemma_mlx import ops


@pytest.fixture(autouse=True)
def cpu_kernels():
    ops.set_kernels("cpu")
    yield
    ops.set_kernels("auto")


def test_tanh_is_within_float32_rounding_of_the_exact_function():
    x = mx.linspace(-20, 20, 200_001)
    got = np.array(ops.tanh(x), dtype=np.float64)
    assert np.abs(got - np.tanh(np.array(x, dtype=np.float64))).max() < 5e-7


def test_tanh_gradient_is_one_minus_its_square():
    x = mx.linspace(-6, 6, 1001)
    g = mx.grad(lambda v: ops.tanh(v).sum())(x)
    exact = 1 - np.tanh(np.array(x, dtype=np.float64)) ** 2
    assert np.abs(np.array(g) - exact).max() < 1e-6


def test_softcap_and_its_gradient_match_the_exact_function():
    x = mx.linspace(-400, 400, 100_001)
    exact = 30 * np.tanh(np.array(x, dtype=np.float64) / 30)
    assert np.abs(np.array(ops.softcap(x, 30.0)) - exact).max() < 3e-5
    g = mx.grad(lambda v: ops.softcap(v, 30.0).sum())(x)
    assert np.abs(np.array(g) - (1 - (exact / 30) ** 2)).max() < 1e-5


def test_exp2_is_within_float32_rounding_and_zero_below_the_normal_range():
    x = mx.linspace(-125, 127, 250_001)
    exact = np.exp2(np.array(x, dtype=np.float64))
    rel = np.abs(np.array(ops.exp2(x), dtype=np.float64) - exact) / exact
    assert rel.max() < 3e-7
    assert np.array(ops.exp2(mx.array([-mx.inf, -200.0, -126.5]))).tolist() == [0.0, 0.0, 0.0]


def test_exp2_gradient_is_ln2_times_its_value():
    x = mx.linspace(-10, 10, 101)
    g = mx.grad(lambda v: ops.exp2(v).sum())(x)
    exact = np.log(2) * np.exp2(np.array(x, dtype=np.float64))
    assert np.abs(np.array(g) - exact).max() / exact.max() < 1e-6


def test_gelu_mul_and_its_gradients_match_mlx_gelu_approx():
    gate = mx.random.normal((64, 256), key=mx.random.key(0)) * 4
    up = mx.random.normal((64, 256), key=mx.random.key(1))
    ct = mx.random.normal((64, 256), key=mx.random.key(2))
    exact = lambda g, u: nn.gelu_approx(g) * u
    assert mx.abs(ops.gelu_mul(gate, up) - exact(gate, up)).max().item() < 1e-5
    _, fast = mx.vjp(ops.gelu_mul, [gate, up], [ct])
    _, slow = mx.vjp(exact, [gate, up], [ct])
    for a, b in zip(fast, slow):
        assert mx.abs(a - b).max().item() < 1e-4


def test_softmax_rows_sum_to_one_and_match_mlx():
    x = mx.random.normal((8, 1000), key=mx.random.key(3)) * 10
    got = ops.softmax(x)
    assert mx.abs(got - mx.softmax(x, axis=-1)).max().item() < 1e-6
    assert mx.abs(got.sum(-1) - 1).max().item() < 1e-5


@pytest.mark.parametrize("blocks", [1, 2])
def test_compiled_training_step_equals_the_plain_step(checkpoint, tmp_path, blocks):
    import train_reference as R
    from dgemma_mlx.train import TrainingArgs
    from dgemma_mlx.train.run import prepare

    R.write_jsonl(tmp_path / "data" / "train.jsonl", R.reverse_rows(9, 12))
    trainers = []
    for compiled in (True, False):
        args = TrainingArgs(fine_tune_type="full", iters=3, batch_size=3, learning_rate=1e-3, seed=1,
                            max_seq_length=48, save_every=100, compile=compiled, blocks_per_example=blocks)
        t = prepare(checkpoint, tmp_path / "data", tmp_path / f"out{compiled}", args)
        for layer in t.model.layers:
            layer.experts.strategy = "dense"  # no host synchronisation: compilable
        t.run()
        trainers.append(t)
    compiled, plain = trainers
    assert compiled.compilable and compiled._compiled and not plain.compilable
    loss = lambda t: [h["loss"] for h in t.history if h["kind"] == "train"]
    np.testing.assert_allclose(loss(compiled), loss(plain), rtol=1e-5)
    from mlx.utils import tree_flatten

    for (name, a), (_, b) in zip(tree_flatten(compiled.model.parameters()), tree_flatten(plain.model.parameters())):
        assert mx.abs(a - b).max().item() < 1e-5, name


# -- host math: NumPy's SIMD loops for the vocabulary-sized inference arrays -------------------------


def large(seed: int, scale: float = 8.0) -> mx.array:
    x = mx.random.normal((4, 300_000), key=mx.random.key(seed)) * scale  # 1.2M floats: above the threshold
    mx.eval(x)
    return x


def test_host_math_is_off_unless_asked_for_and_only_for_large_float32_arrays():
    x = large(0)
    assert not ops.host_math_applies(x)
    with ops.host_math():
        assert ops.host_math_applies(x)
        assert not ops.host_math_applies(x[:, :1000])
        assert not ops.host_math_applies(x.astype(mx.bfloat16))
        with ops.host_math(False):
            assert not ops.host_math_applies(x)
        assert ops.host_math_applies(x)
    assert not ops.host_math_applies(x)


def test_host_math_is_off_with_the_fused_kernels():
    ops.set_kernels("fused")
    with ops.host_math():
        assert not ops.host_math_applies(large(0))


@pytest.mark.parametrize("name", ["softcap", "softmax", "exp2"])
def test_host_math_equals_the_mlx_kernels_to_float32_rounding(name):
    fn = {"softcap": lambda v: ops.softcap(v, 30.0), "softmax": ops.softmax, "exp2": ops.exp2}[name]
    x = large(1, scale=40.0 if name != "exp2" else 20.0)
    want = np.array(fn(x), dtype=np.float64)
    with ops.host_math():
        got = np.array(fn(x), dtype=np.float64)
    scale = np.abs(want).max(axis=-1, keepdims=True)
    assert np.abs(got - want).max() <= 1e-6 * scale.max()
    if name == "softmax":
        assert np.abs(got.sum(-1) - 1).max() < 1e-6  # pairwise sums: closer to 1 than MLX's


def test_host_math_leaves_its_input_alone_and_gives_independent_outputs():
    x = large(2)
    before = np.array(x)
    with ops.host_math():
        a, b = ops.exp2(x), ops.exp2(x)
    mx.eval(a, b)
    np.asarray(a)[0, 0] = -1.0
    assert np.array_equal(np.array(x), before)
    assert np.array(b)[0, 0] != -1.0


def test_sampler_exponentials_on_the_host_equal_the_mlx_ones():
    from dgemma_mlx import sampler

    s = large(3)
    s = mx.where(mx.arange(s.shape[-1]) % 7 == 0, -mx.inf, s)  # masked logits give e = 0, e*z = 0
    m = s.max(-1, keepdims=True)
    e1, ez1 = sampler._exp_terms(s, m)
    with ops.host_math():
        e2, ez2 = sampler._exp_terms(s, m)
    assert mx.abs(e1 - e2).max().item() < 1e-6
    assert mx.abs(ez1 - ez2).max().item() < 1e-5
    assert not mx.isnan(ez2).any().item()


def test_host_soft_cap_of_a_temporary_may_reuse_its_buffer_and_gives_the_same_values():
    x = large(4, scale=40.0)
    want = np.array(ops.softcap(x, 30.0))
    with ops.host_math():
        kept = ops.softcap(x, 30.0)
        assert np.array_equal(np.array(x), np.array(large(4, scale=40.0)))  # not a temporary: untouched
        reused = ops.softcap(x, 30.0, temporary=True)
    assert np.abs(np.array(reused) - want).max() < 1e-5 and np.array_equal(np.array(kept), np.array(reused))


def test_the_samplers_per_position_host_pass_equals_its_steps_one_by_one():
    # One host pass per row (scale, argmax, exponentials, the sum of e * z; probabilities
    # normalised in place) gives exactly what the same steps give run one by one over the whole
    # array, except the entropies: their sum of e * z is NumPy's (pairwise), not MLX's, so they
    # agree to float32 rounding. 150,000 is not a multiple of the sampler's 512-wide blocks.
    from dgemma_mlx import sampler

    logits = large(5, scale=3.0).reshape(4, 2, 150_000)
    logits = mx.where(mx.arange(150_000) % 11 == 0, -mx.inf, logits)  # masked logits: probability 0
    t, u = mx.array(0.6, mx.float32), sampler._uniforms((4, 2), mx.random.key(6))
    before = np.array(logits)
    with ops.host_math():
        scaled = logits / t
        argmax = mx.argmax(scaled, axis=-1).astype(mx.int32)
        e, blocks, block_sums, total, entropy = sampler._softmax_parts(scaled, argmax)
        want = (scaled, argmax, entropy, sampler._inverse_cdf(blocks, block_sums, argmax, u), e / total[..., None])
        want = [np.array(w) for w in want]
        got = [np.array(g) for g in sampler._per_position(logits, t, u)]
    for name, w, g in zip(("scaled", "argmax", "entropy", "sampled", "probs"), want, got):
        assert g.shape == w.shape and g.dtype == w.dtype, name
        if name == "entropy":
            assert np.abs(w - g).max() <= 1e-6 * np.abs(w).max(), name
        else:
            assert np.array_equal(w, g, equal_nan=True), name
    assert np.array_equal(np.array(logits), before)  # the logits are left alone


def attention_inputs(seed: int, L: int = 64, prefix: int = 1200, heads: int = 4, kv: int = 2, D: int = 32):
    """q [1, heads, L, D] and two parts: a cached prefix under a sliding-window-like mask and the
    canvas's keys (heads * L * (prefix + L) = 323,584 scores)."""
    k = mx.random.split(mx.random.key(seed), 5)
    q = mx.random.normal((1, heads, L, D), key=k[0])
    pk, pv = mx.random.normal((1, kv, prefix, D), key=k[1]), mx.random.normal((1, kv, prefix, D), key=k[2])
    ck, cv = mx.random.normal((1, kv, L, D), key=k[3]), mx.random.normal((1, kv, L, D), key=k[4])
    mask = mx.where(mx.arange(prefix)[None] < 200 + mx.arange(L)[:, None], -mx.inf, 0.0)  # [L, prefix]
    mx.eval(q, pk, pv, ck, cv, mask)
    return q, [(pk, pv, mask), (ck, cv, None)]


def test_attention_softmax_on_the_host_is_the_mlx_kernels_value_bit_for_bit(monkeypatch):
    # With host math the MLX kernels already take their exponentials from NumPy; the one host
    # pass (maximum, shift, exponential in place) must not change a bit of the output.
    from dgemma_mlx import attention

    monkeypatch.setattr(ops, "HOST_MATH_MIN_SIZE", 1)  # every exponential of the MLX kernels on the host too
    q, parts = attention_inputs(7)
    plain = np.array(attention.attend(q, parts))
    calls = []
    real = attention.host_exp2_rows
    monkeypatch.setattr(attention, "host_exp2_rows", lambda s: calls.append(len(s)) or real(s))
    with ops.host_math():
        got = np.array(attention.attend(q, parts))
        assert calls == [2]  # one pass over both parts, every head at once
        monkeypatch.setattr(attention, "HOST_SOFTMAX", False)
        want = np.array(attention.attend(q, parts))
    assert np.array_equal(got, want)
    assert np.abs(got - plain).max() < 1e-5  # the polynomial exp2 of the MLX kernels differs in rounding


def test_attention_on_the_host_leaves_queries_keys_values_and_masks_alone(monkeypatch):
    from dgemma_mlx import attention

    monkeypatch.setattr(ops, "HOST_MATH_MIN_SIZE", 100_000)
    q, parts = attention_inputs(8)
    before = [np.array(a) for a in (q, *[x for p in parts for x in p if x is not None])]
    with ops.host_math():
        mx.eval(attention.attend(q, parts))
    after = [np.array(a) for a in (q, *[x for p in parts for x in p if x is not None])]
    assert all(np.array_equal(a, b) for a, b in zip(before, after))


def test_host_exponentials_replace_an_input_they_cannot_write_and_leave_it_alone():
    s = large(9).reshape(1200, 1000).T  # a transposed view: not contiguous
    before = np.array(s)
    (e,) = ops.host_exp2_rows([s])
    assert np.array_equal(np.array(s), before)
    want = np.exp2(before - before.max(axis=-1, keepdims=True))
    assert np.array_equal(np.array(e), want)


def test_host_exponentials_are_zero_below_the_normal_range_as_the_polynomials_are():
    # Subnormal results are slow in np.exp2 and in the matmuls that read them; the host path
    # gives 0 there, exactly where the CPU kernels' polynomial does.
    x = mx.concatenate([mx.linspace(-150, -120, 300_000), mx.array([-126.0, -mx.inf, 0.0])])
    want = np.array(ops.exp2(x))
    with ops.host_math():
        got = np.array(ops.exp2(x))
        (in_place,) = ops.host_exp2_rows([mx.array(np.array(x)[None])])
    for values in (got, np.array(in_place)[0]):
        assert not ((values > 0) & (values < 2.0**-126)).any()
        assert np.array_equal(values == 0, want == 0)
        assert np.abs(values - want).max() <= 3e-7 * 2.0**-120


def test_sampler_exponentials_on_the_host_are_zero_where_the_polynomials_are_for_wide_logits():
    # Scaled logits spanning ~290 log2 units (a soft cap of 30 at temperature 0.3): many
    # exponentials fall under 2**-126, where the host path gives 0 as the MLX path does.
    from dgemma_mlx import sampler

    s = mx.clip(large(10, scale=30.0), -30.0, 30.0) / 0.3
    m = s.max(-1, keepdims=True)
    e1, ez1 = (np.array(a) for a in sampler._exp_terms(s, m))
    with ops.host_math():
        e2, ez2 = (np.array(a) for a in sampler._exp_terms(s, m))
    assert (e1 == 0).mean() > 0.1
    assert np.array_equal(e1 == 0, e2 == 0) and not ((e2 > 0) & (e2 < 2.0**-126)).any()
    assert np.abs(e1 - e2).max() < 1e-6 and np.abs(ez1 - ez2).max() < 1e-5
