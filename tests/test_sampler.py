"""The entropy-bound sampler makes the decisions of transformers' DiffusionGemma reference.

The reference objects (temperature schedule, ``EntropyBoundSampler``, stopping criteria) are run
side by side with ``dgemma_mlx.sampler`` on seeded random logits. Two documented, unavoidable
differences are allowed for, and tested separately:

* torch's default CPU sort is not stable for rows longer than 16, so when an exactly tied group of
  entropies is cut by the bound the reference picks arbitrary members; we pick the lowest
  positions, and match the reference run with a stable sort;
* entropies agree with torch only to float32 rounding (and torch's CPU cumsum accumulates in
  float64), so a position whose ``cumsum - sorted`` lay within that rounding of the bound could go
  either way. The seeded cases below have a few such near misses; all resolve as in the reference.
"""

from __future__ import annotations

import functools
import math
from dataclasses import astuple

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgemma_mlx.sampler import (
    StepResult,
    accept_from_entropy,
    entropy_bound_accept,
    is_confident,
    is_stable,
    renoise,
    sample_tokens,
    sampler_step,
    temperature,
    token_entropy,
    uniform_tokens,
)

SCHEDULES = [(0.4, 0.8, 48), (0.1, 1.0, 64), (0.3, 0.7, 17), (0.0, 1.5, 100), (0.25, 0.9, 7), (0.5, 0.6, 1)]
ENTROPY_RTOL, ENTROPY_ATOL = 1e-5, 1e-6  # plus torch's rounding of (logits - logsumexp), see below


@pytest.fixture(autouse=True, scope="module")
def _single_threaded_torch():
    # The reference runs on small tensors; torch's thread pool only adds contention (10x slower
    # on a busy 2-core machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def np_(a: mx.array) -> np.ndarray:
    return np.array(a)


def torch_entropy(scaled: np.ndarray) -> torch.Tensor:
    return torch.distributions.Categorical(logits=torch.from_numpy(scaled)).entropy()


def reference_accept(scaled: np.ndarray, bound: float) -> np.ndarray:
    """The mask ``EntropyBoundSampler.accept_canvas`` accepts for scaled logits [B, C, V]."""
    batch, canvas, vocab = scaled.shape
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=float(bound)), canvas, vocab, 1)
    current = torch.zeros(batch, canvas, dtype=torch.long)
    sampler.accept_canvas(current, current + 1, torch.from_numpy(scaled), 1)
    return sampler.accepted_token_mask.numpy()


def entropy_atol(scaled: np.ndarray) -> float:
    # Torch computes log-probabilities as logits - logsumexp, rounded at the logits' magnitude.
    return ENTROPY_ATOL + float(np.spacing(np.float32(np.abs(scaled[np.isfinite(scaled)]).max())))


def random_scaled(rng: np.random.Generator, batch: int, canvas: int, vocab: int, scale: float) -> np.ndarray:
    # Per-position spread of scales, so a row mixes confident and unsure positions.
    spread = np.exp(rng.uniform(-2.0, 2.0, size=(batch, canvas, 1)))
    return (rng.standard_normal((batch, canvas, vocab)) * scale * spread).astype(np.float32)


def random_cases(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = (int(rng.integers(1, 4)), int(rng.choice([1, 5, 16, 17, 64, 256])), int(rng.choice([2, 3, 50, 513])))
        scaled = random_scaled(rng, *shape, scale=float(rng.choice([0.1, 1.0, 3.0, 10.0, 30.0])))
        yield scaled, float(rng.choice([1e-3, 0.05, 0.1, 0.5, 2.0, 20.0]))


def chi_square_z(counts: np.ndarray, probs: np.ndarray) -> float:
    """Wilson-Hilferty normal score of Pearson's chi-square statistic (df = bins - 1)."""
    expected = probs * counts.sum()
    stat, df = float(((counts - expected) ** 2 / expected).sum()), len(counts) - 1
    return ((stat / df) ** (1 / 3) - (1 - 2 / (9 * df))) / math.sqrt(2 / (9 * df))


# Temperature ---------------------------------------------------------------------------------


@pytest.mark.parametrize("t_min,t_max,steps", SCHEDULES)
def test_temperature_scales_logits_exactly_like_the_reference_at_every_step(t_min, t_max, steps):
    processor = LinearTemperatureScheduleLogitsProcessor(t_min, t_max, steps)
    logits = np.random.default_rng(0).standard_normal((1, 3, 64)).astype(np.float32) * 20
    for step in range(steps, 0, -1):
        t = temperature(step, steps, t_min, t_max)
        assert t == pytest.approx(t_min + (t_max - t_min) * step / steps, rel=1e-6)
        # `_denoising_step` passes cur_step as an int32 tensor: the reference temperature is float32.
        expected = processor(None, torch.from_numpy(logits), torch.tensor(step, dtype=torch.int32))
        np.testing.assert_array_equal(np_(mx.array(logits) / t), expected.numpy())


# Entropy -------------------------------------------------------------------------------------


def test_entropy_matches_torch_categorical():
    rng = np.random.default_rng(1)
    for vocab in (2, 7, 513, 4096):
        for scale in (0.01, 1.0, 5.0, 30.0, 300.0):
            scaled = (rng.standard_normal((2, 9, vocab)) * scale).astype(np.float32)
            ours = np_(token_entropy(mx.array(scaled)))
            assert ours.dtype == np.float32 and ours.shape == (2, 9)
            expected = torch_entropy(scaled).numpy()
            np.testing.assert_allclose(ours, expected, rtol=ENTROPY_RTOL, atol=entropy_atol(scaled))


def test_entropy_is_accurate_to_float32_rounding():
    rng = np.random.default_rng(2)
    # (vocab, scale, peak): with a peak, one token dominates and the rest carry ~1e-5 of the mass,
    # which float32 loses when summed next to the dominant token's exp(0) = 1.
    cases = [(2, 300.0, 0), (7, 5.0, 0), (513, 1.0, 0), (4096, 30.0, 0), (262144, 5.0, 0), (262144, 0.01, 0),
             (300, 1.0, 12.0), (300, 1.0, 20.0), (262144, 1.0, 18.0)]
    for vocab, scale, peak in cases:
        scaled = (rng.standard_normal((1, 8, vocab)) * scale).astype(np.float32)
        scaled[..., vocab // 3] += peak
        x = scaled.astype(np.float64)
        p = np.exp(x - x.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        exact = -(p * np.log(np.maximum(p, 1e-300))).sum(-1)
        np.testing.assert_allclose(np_(token_entropy(mx.array(scaled))), exact, rtol=1e-5, atol=1e-9)


def test_entropy_ignores_minus_infinity_logits():
    scaled = np.full((1, 2, 10), -np.inf, np.float32)
    scaled[0, :, 3], scaled[0, :, 7] = 1.0, 2.0
    ours = np_(token_entropy(mx.array(scaled)))
    assert np.isfinite(ours).all()
    np.testing.assert_allclose(ours, torch_entropy(scaled).numpy(), rtol=ENTROPY_RTOL, atol=entropy_atol(scaled))


# Acceptance ----------------------------------------------------------------------------------


def test_acceptance_from_the_reference_entropies_equals_the_reference_mask():
    for scaled, bound in random_cases(seed=3, count=300):
        entropy = torch_entropy(scaled)
        ours = np_(accept_from_entropy(mx.array(entropy.numpy()), bound))
        assert ours.dtype == np.bool_ and ours.shape == entropy.shape
        np.testing.assert_array_equal(ours, reference_accept(scaled, bound))


def test_acceptance_from_logits_equals_the_reference_mask():
    compared = accepted = 0
    for scaled, bound in random_cases(seed=4, count=300):
        ours = np_(entropy_bound_accept(mx.array(scaled), bound))
        np.testing.assert_array_equal(ours, reference_accept(scaled, bound))
        assert ours.any(axis=-1).all()
        compared, accepted = compared + ours.size, accepted + ours.sum()
    assert compared // 20 < accepted < compared  # the cases exercise both outcomes


def test_tied_entropies_are_accepted_lowest_position_first(monkeypatch):
    # torch's default sort does not keep tied positions in order: compare with a stable sort.
    rng = np.random.default_rng(5)
    stable_sort = functools.partial(torch.sort, stable=True)
    for _ in range(60):
        canvas, vocab = int(rng.choice([17, 64, 256])), int(rng.choice([3, 50]))
        rows = random_scaled(rng, 2, 4, vocab, scale=float(rng.choice([0.3, 1.0, 3.0])))
        scaled = rows[:, rng.integers(0, 4, size=canvas)]  # each row repeated many times: ties
        bound = float(rng.choice([0.05, 0.5, 2.0, 10.0]))
        ours = np_(entropy_bound_accept(mx.array(scaled), bound))
        reference = reference_accept(scaled, bound)
        entropy = np_(token_entropy(mx.array(scaled)))
        for b in range(scaled.shape[0]):  # same number accepted from every tied group
            for value in np.unique(entropy[b]):
                group = entropy[b] == value
                assert ours[b, group].sum() == reference[b, group].sum()
                assert np.all(np.diff(ours[b, group].astype(int)) <= 0)  # lowest positions first
        with monkeypatch.context() as patch:
            patch.setattr(torch, "sort", stable_sort)
            np.testing.assert_array_equal(ours, reference_accept(scaled, bound))


def test_all_confident_canvas_is_accepted_entirely():
    rng = np.random.default_rng(6)
    scaled = rng.standard_normal((2, 64, 50)).astype(np.float32)
    scaled[np.arange(2)[:, None], np.arange(64), rng.integers(0, 50, size=(2, 64))] = 1e4
    ours = np_(entropy_bound_accept(mx.array(scaled), 0.1))
    assert ours.all()
    np.testing.assert_array_equal(ours, reference_accept(scaled, 0.1))


def test_all_uniform_canvas_accepts_only_the_lowest_entropy_position():
    rng = np.random.default_rng(7)
    nearly = (rng.standard_normal((3, 64, 50)) * 0.3).astype(np.float32)  # entropies 3.8-3.9
    ours = np_(entropy_bound_accept(mx.array(nearly), 0.1))
    np.testing.assert_array_equal(ours, reference_accept(nearly, 0.1))
    assert (ours.sum(-1) == 1).all()
    assert (ours.argmax(-1) == np_(token_entropy(mx.array(nearly))).argmin(-1)).all()

    exactly = np.zeros((3, 64, 50), np.float32)  # every entropy equal to log(50)
    ours = np_(entropy_bound_accept(mx.array(exactly), 0.1))
    assert (ours.sum(-1) == 1).all() and ours[:, 0].all()
    assert (reference_accept(exactly, 0.1).sum(-1) == 1).all()


def test_bound_below_every_entropy_accepts_exactly_the_minimum():
    rng = np.random.default_rng(8)
    for canvas in (1, 17, 256):
        scaled = random_scaled(rng, 2, canvas, 50, scale=1.0)
        entropy = np_(token_entropy(mx.array(scaled)))
        bound = float(entropy.min()) / 2
        ours = np_(entropy_bound_accept(mx.array(scaled), bound))
        assert (ours.sum(-1) == 1).all() and (ours.argmax(-1) == entropy.argmin(-1)).all()
        np.testing.assert_array_equal(ours, reference_accept(scaled, bound))


# Stopping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0, 1, 2])
def test_stop_decisions_equal_the_reference(threshold):
    rng = np.random.default_rng(9 + threshold)
    batch, canvas, vocab, confidence = 4, 8, 16, 0.005
    stops = 0
    for _ in range(15):  # blocks
        reference = StableAndConfidentStoppingCriteria(threshold, confidence)
        history: list[mx.array] = []
        argmax = rng.integers(0, vocab, size=(batch, canvas))
        for step in range(6):
            changed = rng.random(batch) < 0.3
            argmax = np.where(changed[:, None], rng.integers(0, vocab, size=(batch, canvas)), argmax)
            peaked = rng.random(batch) < 0.7  # confident rows: near-zero entropy; others: unsure
            scaled = (rng.standard_normal((batch, canvas, vocab)) * np.where(peaked, 100.0, 1.0)[:, None, None])
            scaled = scaled.astype(np.float32)
            expected = reference(torch.from_numpy(argmax), torch.from_numpy(scaled)).numpy()
            current = mx.array(argmax.astype(np.int32))
            ours = is_stable(history, current, threshold) & is_confident(token_entropy(mx.array(scaled)), confidence)
            np.testing.assert_array_equal(np_(ours), expected)
            if step < threshold:
                assert not np_(is_stable(history, current, threshold)).any()
            history.append(current)
            stops += int(expected.sum())
    assert stops > 0


def test_stability_compares_only_the_last_threshold_canvases():
    a, b = mx.array([[1, 2], [3, 4]]), mx.array([[1, 2], [3, 5]])
    assert np_(is_stable([b, a, a], a, 2)).tolist() == [True, True]
    assert np_(is_stable([a, b, a], a, 2)).tolist() == [True, False]
    assert np_(is_stable([a], a, 2)).tolist() == [False, False]
    assert np_(is_stable([], a, 0)).tolist() == [True, True]


# Sampling ------------------------------------------------------------------------------------


def test_sampling_follows_softmax_of_the_scaled_logits():
    rng = np.random.default_rng(10)
    rows = (rng.standard_normal((3, 12)) * 1.5).astype(np.float32)
    draws = 4096
    scaled = np.repeat(rows[:, None, :], draws, axis=1)
    tokens = np_(sample_tokens(mx.array(scaled), mx.random.key(0)))
    assert tokens.dtype == np.int32 and tokens.shape == (3, draws)
    probs = torch.softmax(torch.from_numpy(rows).double(), -1).numpy()
    for row, p in zip(tokens, probs):
        assert chi_square_z(np.bincount(row, minlength=12), p) < 4.5


def test_sampling_follows_softmax_over_a_large_padded_vocabulary():
    # 3000 tokens: 6 blocks of 512, the last one padded. Compare counts over 30 bins of 100 tokens.
    rng = np.random.default_rng(11)
    row = rng.standard_normal(3000).astype(np.float32)
    scaled = np.repeat(row[None, None, :], 8192, axis=1)
    tokens = np_(sample_tokens(mx.array(scaled), mx.random.key(1)))[0]
    p = torch.softmax(torch.from_numpy(row).double(), -1).numpy()
    assert chi_square_z(np.bincount(tokens // 100, minlength=30), p.reshape(30, 100).sum(-1)) < 4.5


def test_sampling_never_draws_zero_probability_tokens():
    vocab, draws = 1030, 512  # two full blocks and a padded one
    allowed = [[0], [vocab - 1], [511, 512], [3, 700, 1029], [1023, 1024]]
    scaled = np.full((len(allowed), draws, vocab), -np.inf, np.float32)
    scaled[:, :, ::2] = -1e4  # finite, but exp underflows to exactly 0
    for b, tokens in enumerate(allowed):
        scaled[b][:, tokens] = 0.0
    for seed in range(4):
        drawn = np_(sample_tokens(mx.array(scaled), mx.random.key(seed)))
        for b, tokens in enumerate(allowed):
            assert set(drawn[b].tolist()) <= set(tokens)
    assert set(drawn[3].tolist()) == {3, 700, 1029}


def test_the_same_key_gives_the_same_draw():
    scaled = mx.array(random_scaled(np.random.default_rng(12), 2, 64, 700, scale=1.0))
    first = np_(sample_tokens(scaled, mx.random.key(7)))
    np.testing.assert_array_equal(np_(sample_tokens(scaled, mx.random.key(7))), first)
    assert (np_(sample_tokens(scaled, mx.random.key(8))) != first).any()


# Renoising -----------------------------------------------------------------------------------


def test_uniform_tokens_are_int32_ids_in_the_vocabulary():
    ids = np_(uniform_tokens((4, 256), 1000, mx.random.key(0)))
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < 1000
    assert len(np.unique(ids)) > 500
    np.testing.assert_array_equal(np_(uniform_tokens((4, 256), 1000, mx.random.key(0))), ids)


def test_renoise_keeps_accepted_positions_and_redraws_the_rest():
    rng = np.random.default_rng(13)
    accepted = rng.random((3, 256)) < 0.3
    sampled = rng.integers(0, 1000, size=(3, 256)).astype(np.int32)
    canvas = np_(renoise(mx.array(accepted), mx.array(sampled), 1000, mx.random.key(0)))
    assert canvas.dtype == np.int32
    np.testing.assert_array_equal(canvas[accepted], sampled[accepted])
    noise = canvas[~accepted]
    assert noise.min() >= 0 and noise.max() < 1000
    assert (noise != sampled[~accepted]).mean() > 0.9


# The fused step ------------------------------------------------------------------------------

STEP_ARGS = dict(max_steps=12, t_min=0.4, t_max=0.8, entropy_bound=0.5, confidence_threshold=0.05)


def test_sampler_step_agrees_with_the_separate_functions():
    rng = np.random.default_rng(14)
    logits = mx.array(random_scaled(rng, 2, 32, 1100, scale=3.0))
    history = [mx.argmax(logits, axis=-1).astype(mx.int32)]
    key = mx.random.key(3)
    r = sampler_step(logits, step=5, history=history, stability_threshold=1, key=key, **STEP_ARGS)
    sample_key, noise_key = mx.random.split(key)
    scaled = logits / temperature(5, 12, 0.4, 0.8)
    entropy = token_entropy(scaled)
    accepted = accept_from_entropy(entropy, 0.5)
    sampled = sample_tokens(scaled, sample_key)
    assert isinstance(r, StepResult)
    np.testing.assert_array_equal(np_(r.scaled), np_(scaled))
    np.testing.assert_array_equal(np_(r.entropy), np_(entropy))
    np.testing.assert_array_equal(np_(r.mean_entropy), np_(entropy.mean(-1)))
    np.testing.assert_array_equal(np_(r.argmax), np_(mx.argmax(scaled, axis=-1)))
    np.testing.assert_array_equal(np_(r.accepted), np_(accepted))
    np.testing.assert_array_equal(np_(r.canvas), np_(renoise(accepted, sampled, 1100, noise_key)))
    stop = is_stable(history, r.argmax, 1) & is_confident(entropy, 0.05)
    np.testing.assert_array_equal(np_(r.stop), np_(stop))
    np.testing.assert_allclose(np_(r.probs), np_(mx.softmax(scaled, axis=-1)), rtol=1e-5, atol=1e-9)
    dtypes = [r.canvas.dtype, r.argmax.dtype, r.accepted.dtype, r.entropy.dtype, r.probs.dtype]
    assert dtypes == [mx.int32, mx.int32, mx.bool_, mx.float32, mx.float32]


@pytest.mark.parametrize("host", [False, True], ids=["mlx", "host-math"])
@pytest.mark.parametrize("threshold", [0, 1, 2])
def test_sampler_step_decides_like_the_reference_over_a_block(threshold, host, monkeypatch, request):
    # Logits drift towards a fixed target while their noise shrinks, so rows become stable and
    # confident part-way through the block, as in a real denoising run. With host math (the CPU
    # kernels' NumPy pass, here forced on for these small arrays) as without it.
    from dgemma_mlx import ops
    from dgemma_mlx import sampler as sampler_module

    if host:
        monkeypatch.setattr(ops, "HOST_MATH_MIN_SIZE", 1)
        ops.set_kernels("cpu")
        request.addfinalizer(lambda: ops.set_kernels("auto"))
    ran, host_rows = [], sampler_module.host_rows
    monkeypatch.setattr(sampler_module, "host_rows", lambda *a, **k: ran.append(1) or host_rows(*a, **k))
    rng = np.random.default_rng(15 + threshold)
    batch, canvas, vocab, steps = 3, 64, 300, STEP_ARGS["max_steps"]
    processor = LinearTemperatureScheduleLogitsProcessor(STEP_ARGS["t_min"], STEP_ARGS["t_max"], steps)
    stopping = StableAndConfidentStoppingCriteria(threshold, STEP_ARGS["confidence_threshold"])
    target = rng.integers(0, vocab, size=(batch, canvas))
    history: list[mx.array] = []
    stops = accepted = 0
    with ops.host_math(host):
        for i, step in enumerate(range(steps, 0, -1)):
            noise = rng.standard_normal((batch, canvas, vocab)) * 4.0 * (1 - i / steps) ** 2
            raw = noise.astype(np.float32)
            np.put_along_axis(raw, target[..., None], 2.0 + 1.5 * i, axis=-1)
            r = sampler_step(mx.array(raw), step=step, history=history, stability_threshold=threshold,
                             key=mx.random.key(i), **STEP_ARGS)
            scaled = processor(None, torch.from_numpy(raw), torch.tensor(step, dtype=torch.int32))
            np.testing.assert_array_equal(np_(r.scaled), scaled.numpy())
            np.testing.assert_array_equal(np_(r.argmax), torch.argmax(scaled, -1).numpy())
            np.testing.assert_allclose(np_(r.entropy), torch_entropy(scaled.numpy()).numpy(),
                                       rtol=ENTROPY_RTOL, atol=entropy_atol(scaled.numpy()))
            np.testing.assert_array_equal(np_(r.accepted), reference_accept(scaled.numpy(), STEP_ARGS["entropy_bound"]))
            expected = stopping(torch.argmax(scaled, -1), scaled).numpy()
            np.testing.assert_array_equal(np_(r.stop), expected)
            canvas_now = np_(r.canvas)
            assert canvas_now.min() >= 0 and canvas_now.max() < vocab
            history.append(r.argmax)
            stops, accepted = stops + int(expected.sum()), accepted + int(np_(r.accepted).sum())
    assert stops > 0 and 0 < accepted < batch * canvas * steps
    assert bool(ran) == host  # the host pass ran exactly when asked for


def test_sampler_step_does_not_synchronise_with_the_host():
    # Tracing under mx.compile fails on any .item(), .tolist(), np.array or `if` on an array.
    logits = mx.array(random_scaled(np.random.default_rng(16), 2, 16, 600, scale=2.0))
    history = [mx.zeros((2, 16), mx.int32), mx.argmax(logits, axis=-1).astype(mx.int32)]

    def step(logits, key, *history):
        return astuple(sampler_step(logits, step=3, history=list(history), stability_threshold=2, key=key,
                                    **STEP_ARGS))

    compiled = mx.compile(step)(logits, mx.random.key(0), *history)
    plain = step(logits, mx.random.key(0), *history)
    for a, b in zip(compiled, plain):
        np.testing.assert_allclose(np_(a), np_(b), rtol=1e-6, atol=1e-9)


# -- opt-in top-k sampling ---------------------------------------------------------------------------


@pytest.mark.parametrize("V, k", [(32768, 4), (1000, 16), (512 * 64, 64)])
def test_top_k_logits_are_the_k_largest_of_each_position_with_their_ids(V, k):
    from dgemma_mlx.sampler import top_k_logits

    logits = mx.random.normal((2, 5, V), key=mx.random.key(V + k))
    values, ids = top_k_logits(logits, k)
    x = np.array(logits)
    expected = np.sort(x, axis=-1)[..., -k:]
    assert np.array_equal(np.sort(np.array(values), -1), expected)
    assert np.array_equal(np.take_along_axis(x, np.array(ids), -1), np.array(values))


def test_top_k_covering_the_vocabulary_gives_the_full_samplers_decisions():
    from dgemma_mlx.sampler import top_k_logits

    logits = mx.random.normal((2, 6, 40), key=mx.random.key(1)) * 3
    values, ids = top_k_logits(logits, 40)
    kw = dict(step=5, history=[], stability_threshold=1, key=mx.random.key(2), **STEP_ARGS)
    full = sampler_step(logits, **kw)
    top = sampler_step(values, token_ids=ids, vocab_size=40, **kw)
    for name in ("canvas", "argmax", "accepted", "entropy", "mean_entropy", "stop"):
        assert np.array_equal(np.array(getattr(full, name)), np.array(getattr(top, name))), name


def test_top_k_sampling_draws_only_the_k_most_likely_tokens_and_renoises_over_the_vocabulary():
    from dgemma_mlx.sampler import top_k_logits

    V, k = 3000, 3
    logits = mx.random.normal((1, 64, V), key=mx.random.key(3))
    values, ids = top_k_logits(logits, k)
    r = sampler_step(values, step=48, history=[], stability_threshold=1, key=mx.random.key(4),
                     token_ids=ids, vocab_size=V, **{**STEP_ARGS, "entropy_bound": 1e9})
    top = np.array(ids)[0]
    assert all(t in row for t, row in zip(np.array(r.canvas)[0], top))  # every position accepted here
    assert np.array(r.probs).shape == (1, 64, k)
    r = sampler_step(values, step=48, history=[], stability_threshold=1, key=mx.random.key(4),
                     token_ids=ids, vocab_size=V, **{**STEP_ARGS, "entropy_bound": 0.0})
    renoised = np.array(r.canvas)[0][~np.array(r.accepted)[0]]
    assert renoised.max() >= k  # fresh noise comes from the whole vocabulary


def test_sparse_self_conditioning_equals_the_dense_distribution_it_stands_for(model):
    V = model.args.vocab_size
    probs = mx.softmax(mx.random.normal((1, 4, 5), key=mx.random.key(5)), axis=-1)
    ids = mx.array(np.stack([np.random.default_rng(i).choice(V, 5, replace=False) for i in range(4)])[None])
    dense = np.zeros((1, 4, V), np.float32)
    np.put_along_axis(dense, np.array(ids), np.array(probs), axis=-1)
    assert np.allclose(np.array(model.soft_embedding(probs, ids)), np.array(model.soft_embedding(mx.array(dense))),
                       atol=1e-5)
