"""Pinned tokens, warm starts and batched refinement.

* Without pins or a warm start, generation is what it was before they existed (recorded below
  from the code before the change, on the session's tiny checkpoint).
* Pins: in the canvas the model reads at every pass, in every pass's argmax and in the result;
  the sampler's decisions equal a replay through the reference's sampler objects in which the
  pinned positions are forced to accepted and left out of the entropy bound and the mean entropy.
* Warm start: equals the reference's ``decoder_input_ids`` (the first canvas) in a replay.
* Batch refinement of B rows equals B one-row runs, row by row, bit for bit here: with one key
  per row the random draws are the same, and on this model and backend the logits of a row do not
  depend on the others (a different backend may round batched matmuls differently; then rows
  agree to float rounding, not bit for bit).
"""

from __future__ import annotations

import hashlib
import json

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

from dgemma_mlx import DGemmaError
from dgemma_mlx.events import PassEvent, event_to_json
from dgemma_mlx.generate import build_prompt, default_settings, generate, stream_generate
from dgemma_mlx.refine import initial_canvas, refine, refine_block
from dgemma_mlx.sampler import sample_tokens, sampler_step, uniform_tokens
from tiny import DenoiseSpy

# Recorded with the code before pins existed (commit 84d848d), prompt "Why is the sky blue?"
# through the chat template: the final tokens, and a digest of every pass's (argmax, accepted).
RECORDED = [
    (
        dict(steps=6, max_new_tokens=40, seed=11),
        [292, 90, 216, 144, 357, 328, 284, 179, 366, 322, 144, 261, 384, 263, 429, 261, 126, 422, 47, 126,
         448, 404, 108, 79, 161, 161, 287, 65, 65, 148, 427, 417, 194, 271, 412, 220, 194, 412, 194, 350],
        "f3fdd25f16c13e21",
    ),
    (
        dict(steps=8, max_new_tokens=24, seed=5, entropy_bound=20.0),
        [437, 174, 83, 387, 241, 237, 241, 350, 350, 237, 355, 237, 271, 332, 241, 266, 359, 260, 429, 358,
         95, 253, 260, 417],
        "54bf248a2111945f",
    ),
    (
        dict(steps=8, max_new_tokens=40, seed=7, stability_threshold=0, confidence_threshold=5.5),
        [434, 350, 229, 41, 350, 179, 128, 249, 473, 434, 273, 378, 2, 128, 128, 137, 26, 207, 133, 429,
         96, 400, 417, 133, 449, 429, 133, 417, 422, 240, 417, 200, 220, 154, 201, 179, 390, 407, 407, 31],
        "2b3dc2c14bbde93b",
    ),
]


@pytest.fixture
def prompt(tokenizer):
    return build_prompt(tokenizer, "Why is the sky blue?")


def passes_of(events):
    return [e for e in events if isinstance(e, PassEvent)]


def digest(passes) -> str:
    return hashlib.sha256(json.dumps([[p.canvas, p.accepted] for p in passes]).encode()).hexdigest()[:16]


@pytest.mark.parametrize("settings, tokens, recorded_digest", RECORDED)
def test_without_pins_or_warm_start_generation_is_unchanged_bit_for_bit(model, tokenizer, prompt, settings, tokens,
                                                                         recorded_digest):
    events = list(stream_generate(model, tokenizer, prompt, **settings))
    assert events[-1].tokens == tokens
    assert digest(passes_of(events)) == recorded_digest
    assert all(p.pinned is None for p in passes_of(events))



@pytest.mark.parametrize("settings, tokens, recorded_digest", RECORDED)
def test_host_math_keeps_generation_bit_for_bit(model, tokenizer, prompt, settings, tokens, recorded_digest,
                                                monkeypatch):
    from dgemma_mlx import ops

    monkeypatch.setattr(ops, "HOST_MATH_MIN_SIZE", 1)  # the tiny model's arrays take the host path too
    calls = []
    real = ops.host_map
    monkeypatch.setattr(ops, "host_map", lambda *a, **k: calls.append(1) or real(*a, **k))
    import dgemma_mlx.sampler as sampler_module

    monkeypatch.setattr(sampler_module, "host_map", ops.host_map)
    events = list(stream_generate(model, tokenizer, prompt, **settings))
    assert calls  # it ran
    assert events[-1].tokens == tokens
    assert digest(passes_of(events)) == recorded_digest


def pin_pattern(C: int, n: int, offset: int = 0) -> list:
    # Pins at every third generated position (token ids 200 + i), None elsewhere.
    return [200 + (i % 50) if (i + offset) % 3 == 0 else None for i in range(n)]


def test_pinned_tokens_are_in_every_canvas_the_model_reads_every_pass_and_the_result(model, tokenizer, prompt):
    C = model.args.canvas_length
    pins = pin_pattern(C, 2 * C)
    spy = DenoiseSpy(model)
    events = list(stream_generate(spy, tokenizer, prompt, steps=5, max_new_tokens=2 * C, seed=1, pinned=pins))
    passes = passes_of(events)
    assert len(spy.canvases) == len(passes) == 10
    for canvas, p in zip(spy.canvases, passes):
        block_pins = pins[p.block * C : (p.block + 1) * C]
        for i, t in enumerate(block_pins):
            if t is not None:
                assert canvas[i] == t and p.canvas[i] == t and p.accepted[i] and p.pinned[i]
            else:
                assert not p.pinned[i]
    out = events[-1].tokens
    assert all(out[i] == t for i, t in enumerate(pins) if t is not None)
    assert event_to_json(passes[0])["pinned"] == passes[0].pinned


def test_pins_do_not_change_the_free_positions_random_stream_when_nothing_is_pinned(model, tokenizer, prompt):
    a = generate(model, tokenizer, prompt, **RECORDED[0][0], pinned=[None] * 8, warm_start=[-1] * 8)
    assert a.tokens == RECORDED[0][1]


def replay(model, prompt, settings, *, warm=None, pins=None):
    """One block by hand: our encode/denoise and random draws; the reference's temperature,
    ``EntropyBoundSampler.accept_canvas`` and stopping criteria, applied to the free positions
    only (pinned ones forced to accepted, their token forced into the canvas and the argmax).
    ``warm`` replaces the first canvas as the reference's ``decoder_input_ids`` does.
    Returns per pass (argmax, accepted, stop)."""
    C, V = model.args.canvas_length, model.args.vocab_size
    pins = np.full(C, -1) if pins is None else np.array(pins)
    fixed, free = pins >= 0, np.flatnonzero(pins < 0)
    temperature = LinearTemperatureScheduleLogitsProcessor(settings.t_min, settings.t_max, settings.steps)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(settings.entropy_bound), len(free), V, settings.steps)
    stopper = StableAndConfidentStoppingCriteria(settings.stability_threshold, settings.confidence_threshold)
    cache = model.make_cache()
    model.encode(mx.array(prompt)[None], cache)
    key, init_key = mx.random.split(mx.random.key(settings.seed))
    canvas = np.array(uniform_tokens((1, C), V, init_key))
    if warm is not None:
        canvas = np.array(warm)[None]
    canvas[0, fixed] = pins[fixed]
    sc, decisions = None, []
    for n in range(settings.steps, 0, -1):
        key, step_key = mx.random.split(key)
        sample_key, noise_key = mx.random.split(step_key)
        logits = model.denoise(mx.array(canvas), cache, sc)
        scaled = temperature(None, torch.tensor(np.array(logits)), cur_step=torch.tensor(n, dtype=torch.int32))
        sampled = np.array(sample_tokens(mx.array(scaled.numpy()), sample_key))
        sampled[0, fixed] = pins[fixed]
        sampler.accept_canvas(torch.tensor(canvas[:, free]), torch.tensor(sampled[:, free]), scaled[:, free], n)
        accepted = fixed.copy()
        accepted[free] = sampler.accepted_token_mask[0].numpy()
        argmax = scaled.argmax(-1)
        argmax[0, torch.tensor(fixed)] = torch.tensor(pins[fixed])
        stop = bool(stopper(argmax, scaled[:, free])[0]) or not len(free)
        decisions.append((argmax[0].tolist(), accepted.tolist(), stop))
        if stop:
            break
        canvas = np.where(accepted[None], sampled, np.array(uniform_tokens((1, C), V, noise_key)))
        sc = mx.array(scaled.numpy())
    return decisions


def ours(model, tokenizer, prompt, **kw):
    return [(p.canvas, p.accepted, p.stopped) for p in passes_of(stream_generate(model, tokenizer, prompt, **kw))]


@pytest.mark.parametrize(
    "settings",
    [dict(steps=8, seed=3), dict(steps=6, seed=4, entropy_bound=3.0),
     dict(steps=10, seed=5, entropy_bound=1.0, stability_threshold=0, confidence_threshold=4.0)],
)
@pytest.mark.parametrize("offset", [0, 1])
def test_sampler_decisions_with_pins_equal_the_reference_sampler_on_the_free_positions(
    model, tokenizer, prompt, settings, offset
):
    C = model.args.canvas_length
    pins = pin_pattern(C, C, offset)
    kw = dict(settings, max_new_tokens=C)
    got = ours(model, tokenizer, prompt, pinned=pins, **kw)
    expected = replay(model, prompt, default_settings(model).update(**kw),
                      pins=[-1 if t is None else t for t in pins])
    assert got == expected


def test_the_stop_rule_averages_entropy_over_free_positions_only(model, tokenizer, prompt):
    # Stop when the mean entropy of the free positions falls below a threshold that the mean over
    # the whole canvas never reaches (the pinned positions are made uncertain): ours stops where
    # the replay (free positions only) does.
    C = model.args.canvas_length
    pins = pin_pattern(C, C)
    free_means = [p.mean_entropy for p in passes_of(stream_generate(
        model, tokenizer, prompt, steps=8, max_new_tokens=C, seed=9, pinned=pins,
        stability_threshold=0, confidence_threshold=1e-9))]
    threshold = float(np.median(free_means)) + 1e-6
    kw = dict(steps=8, max_new_tokens=C, seed=9, stability_threshold=0, confidence_threshold=threshold)
    got = ours(model, tokenizer, prompt, pinned=pins, **kw)
    expected = replay(model, prompt, default_settings(model).update(**kw), pins=[-1 if t is None else t for t in pins])
    assert got == expected and got[-1][2]


def test_warm_start_equals_the_references_decoder_input_ids(model, tokenizer, prompt):
    C = model.args.canvas_length
    warm = [(7 * i + 120) % 300 for i in range(C)]
    for kw in (dict(steps=6, seed=2), dict(steps=6, seed=8, entropy_bound=4.0)):
        kw = dict(kw, max_new_tokens=C)
        got = ours(model, tokenizer, prompt, warm_start=warm, **kw)
        assert got == replay(model, prompt, default_settings(model).update(**kw), warm=warm)
        assert got != ours(model, tokenizer, prompt, **kw)


def test_a_partial_warm_start_sets_only_its_positions_of_the_first_canvas():
    noise = uniform_tokens((1, 8), 512, mx.random.key(0))
    warm = mx.array([[5, -1, 6, -1, -1, -1, -1, 7]])
    pins = mx.array([[-1, -1, 9, -1, -1, -1, -1, -1]])
    first = np.array(initial_canvas((1, 8), 512, mx.random.key(0), warm_start=warm, pinned=pins))[0]
    assert first.tolist() == [5, *np.array(noise)[0, 1:2], 9, *np.array(noise)[0, 3:7], 7]


def test_a_row_with_nothing_free_stops_at_once_with_its_pins():
    logits = mx.random.normal((2, 4, 32), key=mx.random.key(1))
    pins = mx.array([[3, 4, 5, 6], [3, -1, -1, -1]])
    r = sampler_step(logits, step=5, max_steps=5, t_min=0.4, t_max=0.8, entropy_bound=0.1,
                     confidence_threshold=1e-9, history=[], stability_threshold=1, key=mx.random.key(0),
                     pinned=pins)
    assert np.array(r.stop).tolist() == [True, False]
    assert np.array(r.canvas)[0].tolist() == np.array(r.argmax)[0].tolist() == [3, 4, 5, 6]
    assert np.array(r.accepted)[0].all() and np.array(r.accepted)[1, 0]


def test_pinned_positions_take_no_share_of_the_entropy_bound():
    # Entropies e0 < e1 < e2 < e3 and a bound between e1 and e0 + e1: free, the budget spent on
    # position 0 leaves no room for position 2; with position 0 pinned, position 2 fits.
    logits = np.zeros((1, 4, 16), np.float32)
    logits[0, :, 0] = [12.0, 8.0, 6.0, 2.0]
    args = dict(step=1, max_steps=1, t_min=0.4, t_max=0.8, confidence_threshold=1e-9,
                history=[], stability_threshold=1, key=mx.random.key(0))
    e = np.array(sampler_step(mx.array(logits), entropy_bound=1.0, **args).entropy)[0]
    assert (np.diff(e) > 0).all()
    bound = float(e[1] + e[0] / 2)
    free = sampler_step(mx.array(logits), entropy_bound=bound, **args)
    pinned = sampler_step(mx.array(logits), entropy_bound=bound, **args, pinned=mx.array([[7, -1, -1, -1]]))
    assert np.array(free.accepted)[0].tolist() == [True, True, False, False]
    assert np.array(pinned.accepted)[0].tolist() == [True, True, True, False]
    assert np.array(pinned.canvas)[0, 0] == 7
    assert float(np.array(pinned.mean_entropy)[0]) == pytest.approx(e[1:].mean(), rel=1e-6)


@pytest.mark.parametrize("bad", [[None, 512], [-2], [1.5], ["a"]])
def test_bad_pinned_or_warm_tokens_are_one_line_errors(model, tokenizer, prompt, bad):
    for name in ("pinned", "warm_start"):
        with pytest.raises(DGemmaError) as e:
            list(stream_generate(model, tokenizer, prompt, max_new_tokens=16, **{name: bad}))
        assert "\n" not in str(e.value)


def test_pins_beyond_the_generated_positions_are_an_error(model, tokenizer, prompt):
    with pytest.raises(DGemmaError, match="more than the 16"):
        list(stream_generate(model, tokenizer, prompt, max_new_tokens=16, pinned=[None] * 17))


def batch_setup(model, tokenizer, prompt):
    C, V = model.args.canvas_length, model.args.vocab_size
    cache = model.make_cache()
    model.encode(mx.array(prompt)[None], cache)
    pins = np.full((3, C), -1, np.int32)
    pins[1, :] = np.arange(C) + 150  # nothing free: stops at the first pass
    pins[2, ::2] = 300
    keys = mx.random.split(mx.random.key(4), 3)
    canvas = mx.concatenate([initial_canvas((1, C), V, keys[b], pinned=mx.array(pins[b : b + 1])) for b in range(3)])
    return cache, canvas, mx.array(pins), mx.random.split(mx.random.key(5), 3)


def test_batch_refinement_equals_independent_runs_row_by_row(model, tokenizer, prompt):
    cache, canvas, pins, keys = batch_setup(model, tokenizer, prompt)
    settings = default_settings(model).update(steps=7, entropy_bound=2.0, stability_threshold=0,
                                              confidence_threshold=2.5)
    batch = list(refine_block(model, cache, canvas, settings=settings, key=keys, pinned=pins, score=True))
    last = batch[-1]
    assert last.done and last.passes[1] == 1 and len(set(last.passes.tolist())) > 1
    for b in range(3):
        single = list(refine_block(model, cache, canvas[b : b + 1], settings=settings, key=keys[b],
                                   pinned=pins[b : b + 1], score=True))
        assert len(single) == last.passes[b]
        for batch_pass, single_pass in zip(batch, single):  # every pass, not only the last
            assert np.array_equal(np.array(batch_pass.argmax)[b], np.array(single_pass.argmax)[0])
            assert np.array_equal(np.array(batch_pass.accepted)[b], np.array(single_pass.accepted)[0])
        for name in ("argmax", "accepted", "entropy", "mean_entropy", "logprob"):
            assert np.array_equal(np.array(getattr(last, name))[b], np.array(getattr(single[-1], name))[0]), name
        # the row keeps its final state in the batch's later passes
        for p in batch[last.passes[b]:]:
            assert not p.refined[b] and p.stopped[b]
            assert np.array_equal(np.array(p.argmax)[b], np.array(single[-1].argmax)[0])


def test_stopped_rows_leave_the_batch(model, tokenizer, prompt, monkeypatch):
    cache, canvas, pins, keys = batch_setup(model, tokenizer, prompt)
    rows = []
    original = model.denoise
    monkeypatch.setattr(model, "denoise", lambda c, *a, **kw: (rows.append(c.shape[0]), original(c, *a, **kw))[1])
    settings = default_settings(model).update(steps=4)
    last = refine(model, cache, canvas, settings=settings, key=keys, pinned=pins)
    assert rows == [3, 2, 2, 2] and last.passes.tolist() == [4, 1, 4]


def test_scores_are_log_probabilities_of_the_argmax_at_temperature_one(model, tokenizer, prompt):
    C, V = model.args.canvas_length, model.args.vocab_size
    cache = model.make_cache()
    model.encode(mx.array(prompt)[None], cache)
    canvas = initial_canvas((1, C), V, mx.random.key(0))
    first = next(refine_block(model, cache, canvas, settings=default_settings(model).update(steps=3),
                              key=mx.random.key(1), score=True))
    logits = np.array(model.denoise(canvas, cache), dtype=np.float64)[0]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    expected = logp[np.arange(C), np.array(first.argmax)[0]]
    assert np.allclose(np.array(first.logprob)[0], expected, atol=1e-5)


def test_a_chat_reply_can_pin_tokens(model, tokenizer):
    from dgemma_mlx.chat import ChatSession

    session = ChatSession(model, tokenizer, settings=default_settings(model).update(steps=3, seed=2, max_new_tokens=16))
    events = list(session.send("Hi", pinned=[None, 300, None, 301]))
    for p in passes_of(events):
        assert p.canvas[1] == 300 and p.canvas[3] == 301
    assert session.messages[-1]["role"] == "assistant"


def test_refinement_waits_for_the_device_once_per_pass(model, tokenizer, prompt, monkeypatch):
    import dgemma_mlx.refine as refine_module

    cache, canvas, pins, keys = batch_setup(model, tokenizer, prompt)
    waits = []

    class CountingMx:
        def __getattr__(self, name):
            return getattr(mx, name)

        def eval(self, *arrays):
            waits.append(len(arrays))
            return mx.eval(*arrays)

    monkeypatch.setattr(refine_module, "mx", CountingMx())
    last = refine(model, cache, canvas, settings=default_settings(model).update(steps=4), key=keys, pinned=pins)
    assert len(waits) == last.step == 4


# -- opt-in fast sampling: accepted positions frozen -------------------------------------------------


def test_denoise_can_compute_the_logits_of_chosen_positions_only(model, tokenizer, prompt):
    C, V = model.args.canvas_length, model.args.vocab_size
    cache = model.make_cache()
    model.encode(mx.array(prompt)[None], cache)
    canvas = initial_canvas((2, C), V, mx.random.key(0))
    chosen = mx.array([[0, 3, 5], [7, 7, 1]], dtype=mx.int32)
    every = np.array(model.denoise(canvas, cache))
    some = np.array(model.denoise(canvas, cache, positions=chosen))
    assert some.shape == (2, 3, V)
    assert np.allclose(some, np.take_along_axis(every, np.array(chosen)[..., None], axis=1), atol=1e-5)


def frozen_run(model, tokenizer, prompt, *, pins=None, rows=1, **settings):
    C, V = model.args.canvas_length, model.args.vocab_size
    cache = model.make_cache()
    model.encode(mx.array(prompt)[None], cache)
    pinned = None if pins is None else mx.array(pins)
    canvas = initial_canvas((rows, C), V, mx.random.key(2), pinned=pinned)
    spy = DenoiseSpy(model)
    computed = []
    original = spy.denoise
    spy.denoise = lambda c, cache, *a, positions=None, **kw: (
        computed.append(C if positions is None else positions.shape[1]), original(c, cache, *a, positions=positions, **kw))[1]
    s = default_settings(model).update(freeze_accepted=True, **settings)
    return list(refine_block(spy, cache, canvas, settings=s, key=mx.random.key(3), pinned=pinned)), computed


def test_freeze_accepted_keeps_every_accepted_token_for_the_rest_of_the_block(model, tokenizer, prompt):
    passes, computed = frozen_run(model, tokenizer, prompt, steps=48, entropy_bound=1.0)
    C = model.args.canvas_length
    frozen = {}
    for p in passes:
        argmax, accepted = np.array(p.argmax)[0], np.array(p.accepted)[0]
        for i, token in frozen.items():
            assert accepted[i] and argmax[i] == token
        frozen.update({i: argmax[i] for i in np.flatnonzero(accepted)})
    assert len(frozen) == C and passes[-1].done and len(passes) < 48
    # the first pass reads every position, each later one only the positions not yet frozen
    assert computed[0] == C and all(a > b for a, b in zip(computed[1:], computed[2:]))
    assert computed[1:] == [C - int(np.array(p.accepted)[0].sum()) for p in passes[:-1]]


def test_freeze_accepted_never_computes_pinned_positions_after_the_first_pass(model, tokenizer, prompt):
    C = model.args.canvas_length
    pins = np.full((1, C), -1, np.int32)
    pins[0, ::2] = 300
    passes, computed = frozen_run(model, tokenizer, prompt, pins=pins, steps=48)
    assert computed[0] == C and max(computed[1:]) <= C // 2
    for p in passes:
        assert (np.array(p.argmax)[0, ::2] == 300).all()



def test_freeze_accepted_keeps_each_positions_self_conditioning_from_the_last_pass_that_computed_it(
        model, tokenizer, prompt):
    # Each pass reads a per-position soft embedding [B, C, H], never a vocabulary-sized input: a
    # computed position's is the soft embedding of that pass's probabilities there, a frozen one's
    # stays what it was.
    cache, canvas, _, _ = batch_setup(model, tokenizer, prompt)
    canvas = canvas[:1]
    C, H = model.args.canvas_length, model.args.hidden_size
    reads, outs = [], []
    spy = DenoiseSpy(model)

    def denoise(c, cache_, sc_logits=None, positions=None, **kw):
        assert sc_logits is None and kw.get("self_conditioning_probs") is None
        reads.append((kw.get("self_conditioning_embedding"), positions))
        outs.append(model.denoise(c, cache_, positions=positions, **kw))
        return outs[-1]

    spy.denoise = denoise
    s = default_settings(model).update(freeze_accepted=True, steps=8, entropy_bound=0.5)
    passes = list(refine_block(spy, cache, canvas, settings=s, key=mx.random.key(3)))
    assert reads[0][0] is None and len(reads) == len(passes) >= 3
    for k in range(1, len(reads)):
        soft, before = reads[k][0], (reads[k - 1][0] if k > 1 else None)
        assert soft.shape == (1, C, H)
        computed = np.array(reads[k - 1][1])[0]
        t = passes[k - 1].temperature
        probs = mx.softmax(outs[k - 1] / t, axis=-1)
        want = np.array(model.soft_embedding(probs))[0]
        got = np.array(soft)[0]
        assert np.allclose(got[computed], want, atol=1e-5)
        others = np.setdiff1d(np.arange(C), computed)
        if before is not None and len(others):
            assert np.array_equal(got[others], np.array(before)[0][others])


def test_freeze_accepted_fills_the_free_positions_after_a_frozen_eos_with_eos():
    from dgemma_mlx.refine import _freeze

    fixed = mx.array([[-1, 5, -1, -1, 9, -1]], dtype=mx.int32)
    accepted = mx.array([[False, True, True, False, True, False]])
    canvas = mx.array([[4, 5, 1, 7, 9, 8]], dtype=mx.int32)  # position 2 accepts EOS (id 1)
    # the accepted EOS at 2 fills 3 and 5; fixed tokens (4: 9) stay as they are
    assert np.array(_freeze(fixed, accepted, canvas, (1, 106))).tolist() == [[-1, 5, 1, 1, 9, 1]]
    assert np.array(_freeze(fixed, accepted, canvas, ())).tolist() == [[-1, 5, 1, -1, 9, -1]]


def test_freeze_accepted_is_opt_in():
    from dgemma_mlx.settings import DEFAULTS, GenerationSettings, SettingError

    assert DEFAULTS.freeze_accepted is False
    assert GenerationSettings().update(freeze_accepted="true").freeze_accepted is True
    with pytest.raises(SettingError, match="freeze_accepted"):
        GenerationSettings().update(freeze_accepted="maybe")


def test_top_k_sampling_draws_among_each_positions_k_most_likely_tokens(model, tokenizer, prompt):
    from dgemma_mlx.sampler import top_k_logits

    C, V = model.args.canvas_length, model.args.vocab_size
    cache = model.make_cache()
    model.encode(mx.array(prompt)[None], cache)
    canvas = initial_canvas((1, C), V, mx.random.key(0))
    settings = default_settings(model).update(top_k=2, steps=6, entropy_bound=3.0)
    spy = DenoiseSpy(model)
    passes = list(refine_block(spy, cache, canvas, settings=settings, key=mx.random.key(1)))
    assert len(passes) == 6 and len(spy.canvases) == 6
    # the first pass (no self-conditioning yet): its accepted draws are among the top 2 there
    top = np.array(top_k_logits(model.denoise(canvas, cache), 2)[1])[0]
    accepted = np.flatnonzero(np.array(passes[0].accepted)[0])
    assert len(accepted) > 1 and all(spy.canvases[1][i] in top[i] for i in accepted)
