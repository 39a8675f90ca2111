"""Block-by-block generation: faithful to the reference sampler, EOS handling, encode-once, seeds."""

from __future__ import annotations

import json
import math

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

from dgemma_mlx import DGemmaError, load
from dgemma_mlx.events import CommitEvent, PassEvent
from dgemma_mlx.generate import GenerationSettings, build_prompt, default_settings, generate, stream_generate
from dgemma_mlx.sampler import sample_tokens, uniform_tokens

SETTINGS = dict(steps=6, max_new_tokens=40, seed=11)


@pytest.fixture
def prompt(tokenizer):
    return build_prompt(tokenizer, "Why is the sky blue?")


def run(model, tokenizer, prompt, **kw):
    events = list(stream_generate(model, tokenizer, prompt, **{**SETTINGS, **kw}))
    return (
        [e for e in events if isinstance(e, PassEvent)],
        [e for e in events if isinstance(e, CommitEvent)],
        events[-1],
    )


def replay(model, prompt, settings: GenerationSettings, confidence_threshold=None):
    """Re-run generation by hand: our encode/denoise and random draws, the reference's
    temperature, acceptance and stopping objects. Returns the committed argmax canvases."""
    C, V = model.args.canvas_length, model.args.vocab_size
    eos = set(model.args.eos_token_ids)
    temperature = LinearTemperatureScheduleLogitsProcessor(settings.t_min, settings.t_max, settings.steps)
    sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(settings.entropy_bound), C, V, settings.steps)
    stopper = StableAndConfidentStoppingCriteria(settings.stability_threshold, settings.confidence_threshold)
    cache = model.make_cache()
    model.encode(mx.array(prompt)[None], cache)
    key = mx.random.key(settings.seed)
    blocks, produced = [], 0
    for _ in range(math.ceil(settings.max_new_tokens / C)):
        key, init_key = mx.random.split(key)
        canvas = uniform_tokens((1, C), V, init_key)
        stopper.reset()
        sc = None
        for n in range(settings.steps, 0, -1):
            key, step_key = mx.random.split(key)
            sample_key, noise_key = mx.random.split(step_key)
            logits = model.denoise(canvas, cache, sc)
            scaled = temperature(None, torch.tensor(np.array(logits)), cur_step=torch.tensor(n, dtype=torch.int32))
            sampled = sample_tokens(mx.array(scaled.numpy()), sample_key)
            current = torch.tensor(np.array(canvas)).long()
            sampler.accept_canvas(current, torch.tensor(np.array(sampled)).long(), scaled, n)
            accepted = mx.array(sampler.accepted_token_mask.numpy())
            argmax = scaled.argmax(-1)
            stop = bool(stopper(argmax, scaled)[0])
            if stop:
                break
            canvas = mx.where(accepted, sampled, uniform_tokens((1, C), V, noise_key))
            sc = mx.array(scaled.numpy())
        block = argmax[0].tolist()
        blocks.append(block)
        cut = next((i for i, t in enumerate(block) if t in eos), None)
        produced += C if cut is None else cut
        if cut is not None or produced >= settings.max_new_tokens:
            break
        model.encode(mx.array(block)[None], cache)
    return blocks


def test_committed_blocks_match_a_step_by_step_replay_with_the_reference_sampler(model, tokenizer, prompt):
    passes, commits, end = run(model, tokenizer, prompt, max_new_tokens=40)
    settings = default_settings(model).update(**{**SETTINGS, "max_new_tokens": 40})
    expected = replay(model, prompt, settings)
    assert len(commits) == len(expected) == 3
    for commit, block, last_pass in zip(commits, expected, [p for p in passes if p.stopped or p.step == 6]):
        assert last_pass.canvas == block
        n = len(commit.tokens)
        assert commit.tokens == block[:n]
    assert end.tokens == sum((c.tokens for c in commits), [])


def test_adaptive_stop_ends_a_block_early_like_the_reference(model, tokenizer, prompt):
    # With stability_threshold=0 the confidence test alone decides: pick a threshold that the
    # mean entropy first falls under at a later pass, and expect the block to end exactly there.
    free, _, _ = run(model, tokenizer, prompt, steps=12, max_new_tokens=16, stability_threshold=0,
                     confidence_threshold=1e-9)
    entropies = [p.mean_entropy for p in free]
    j = int(np.argmin(entropies))
    assert j > 0, "the test needs a later pass to be more confident than the first"
    threshold = (entropies[j] + min(entropies[:j])) / 2
    kw = dict(steps=12, max_new_tokens=16, stability_threshold=0, confidence_threshold=threshold)
    passes, commits, _ = run(model, tokenizer, prompt, **kw)
    expected = replay(model, prompt, default_settings(model).update(**{**SETTINGS, **kw}))
    assert passes[-1].stopped and commits[0].steps == len(passes) == j + 1
    assert passes[-1].canvas == expected[0]


def test_same_seed_same_output_and_another_seed_differs(model, tokenizer, prompt):
    a = generate(model, tokenizer, prompt, **SETTINGS)
    b = generate(model, tokenizer, prompt, **SETTINGS)
    c = generate(model, tokenizer, prompt, **{**SETTINGS, "seed": 12})
    assert a.tokens == b.tokens and a.text == b.text
    assert a.tokens != c.tokens


def test_encode_runs_once_for_the_prompt_and_once_per_committed_block_but_the_last(model, tokenizer, prompt, monkeypatch):
    calls = []
    original = model.encode
    monkeypatch.setattr(model, "encode", lambda ids, cache, **kw: (calls.append(ids.shape[1]), original(ids, cache, **kw))[1])
    _, commits, _ = run(model, tokenizer, prompt, max_new_tokens=3 * model.args.canvas_length)
    assert len(commits) == 3
    assert calls == [len(prompt)] + [model.args.canvas_length] * 2
    assert [c.encoded for c in commits] == [True, True, False]


def test_max_new_tokens_cuts_the_last_block(model, tokenizer, prompt):
    C = model.args.canvas_length
    _, commits, end = run(model, tokenizer, prompt, max_new_tokens=C + 5)
    assert [len(c.tokens) for c in commits] == [C, 5]
    assert len(end.tokens) == C + 5 and end.finish_reason == "length"


def test_a_short_canvas_makes_the_last_block_only_as_long_as_the_tokens_left(model, tokenizer, prompt):
    from tiny import DenoiseSpy

    C = model.args.canvas_length
    spy = DenoiseSpy(model)
    events = list(stream_generate(spy, tokenizer, prompt, max_new_tokens=C + 5, steps=4, seed=1, short_canvas=True))
    passes = [e for e in events if isinstance(e, PassEvent)]
    first = [len(p.canvas) for p in passes if p.block == 0]
    last = [len(p.canvas) for p in passes if p.block == 1]
    assert set(first) == {C} and set(last) == {5}
    assert {len(c) for c in spy.canvases[len(first):]} == {5}  # the model reads 5 positions
    assert [len(c.tokens) for c in events if isinstance(c, CommitEvent)] == [C, 5]


def test_a_short_canvas_leaves_whole_blocks_and_the_default_alone(model, tokenizer, prompt):
    C = model.args.canvas_length

    def blocks(**kw):
        events = list(stream_generate(model, tokenizer, prompt, steps=3, seed=2, **kw))
        return [(e.block, e.canvas) for e in events if isinstance(e, PassEvent)]

    assert blocks(max_new_tokens=2 * C, short_canvas=True) == blocks(max_new_tokens=2 * C)
    assert {len(c) for _, c in blocks(max_new_tokens=C - 3)} == {C}  # off by default


def test_pins_past_the_last_token_are_an_error_with_a_short_canvas(model, tokenizer, prompt):
    with pytest.raises(DGemmaError, match="more than the 6 being generated"):
        generate(model, tokenizer, prompt, max_new_tokens=6, short_canvas=True, pinned=[None] * 7 + [5])


class ForcedEOS:
    """Wraps the model so that block ``block`` puts an EOS at canvas position ``pos``."""

    def __init__(self, model, eos, block, pos):
        self.model, self.eos, self.block, self.pos = model, eos, block, pos
        self.blocks_seen = -1
        self.last_offset = None

    def __getattr__(self, name):
        return getattr(self.model, name)

    def denoise(self, canvas, cache, sc=None, **kw):
        if cache.offset != self.last_offset:
            self.last_offset = cache.offset
            self.blocks_seen += 1
        logits = self.model.denoise(canvas, cache, sc, **kw)
        if self.blocks_seen == self.block:
            bump = mx.zeros(logits.shape).at[:, self.pos, self.eos].add(1e4)
            logits = logits + bump
        return logits


def test_eos_ends_generation_and_nothing_after_it_is_returned(model, tokenizer, prompt):
    eos = model.args.eos_token_ids[1]
    forced = ForcedEOS(model, eos, block=1, pos=5)
    passes, commits, end = run(forced, tokenizer, prompt, max_new_tokens=10 * model.args.canvas_length)
    assert len(commits) == 2 and commits[-1].eos and commits[-1].finished and not commits[-1].encoded
    last_canvas = [p for p in passes if p.block == 1][-1].canvas
    assert last_canvas[5] == eos
    assert commits[-1].tokens == last_canvas[:5]
    assert end.finish_reason == "eos" and eos not in end.tokens
    assert len(end.tokens) == model.args.canvas_length + 5
    # the reference counts the EOS as a generated token in tokens-per-forward
    assert end.stats.tokens_per_forward == pytest.approx((len(end.tokens) + 1) / end.stats.steps)


def test_pass_events_describe_each_pass(model, tokenizer, prompt):
    passes, _, end = run(model, tokenizer, prompt, max_new_tokens=16, steps=5)
    C = model.args.canvas_length
    first = passes[0]
    assert (first.block, first.step, first.max_steps) == (0, 1, 5)
    assert len(first.canvas) == len(first.accepted) == len(first.entropy) == C
    assert first.accepted_count >= 1
    assert first.mean_entropy == pytest.approx(float(np.mean(first.entropy)), rel=1e-5)
    assert first.temperature == pytest.approx(0.8)
    assert [p.temperature for p in passes] == sorted([p.temperature for p in passes], reverse=True)
    assert end.stats.steps == len(passes) and end.stats.blocks == 1 and end.stats.prompt_tokens == len(prompt)


def test_settings_default_to_the_checkpoint_generation_config(checkpoint, tmp_path):
    custom = tmp_path / "custom"
    custom.mkdir()
    for f in checkpoint.iterdir():
        (custom / f.name).symlink_to(f)
    (custom / "generation_config.json").unlink()
    config = {"max_denoising_steps": 7, "t_min": 0.2, "t_max": 0.9, "max_new_tokens": 40,
              "sampler_config": {"entropy_bound": 0.3}, "eos_token_id": [1, 106, 50]}
    (custom / "generation_config.json").write_text(json.dumps(config))
    model, _ = load(custom)
    settings = default_settings(model)
    assert (settings.steps, settings.t_min, settings.t_max, settings.max_new_tokens, settings.entropy_bound) == (
        7, 0.2, 0.9, 40, 0.3)
    assert settings.confidence_threshold == GenerationSettings().confidence_threshold  # absent: the reference's
    assert GenerationSettings.from_generation_config({"max_denoising_steps": 7, "t_min": None}).t_min == 0.4
    assert GenerationSettings.from_generation_config({}) == GenerationSettings()


def test_passes_walk_the_temperature_schedule_from_t_max_down(model, tokenizer, prompt):
    # A confidence threshold nothing reaches: every block takes all its passes.
    events = list(stream_generate(model, tokenizer, prompt, steps=4, max_new_tokens=16, seed=0,
                                  t_min=0.2, t_max=1.0, confidence_threshold=1e-30))
    temperatures = [e.temperature for e in events if isinstance(e, PassEvent)]
    assert temperatures[0] == pytest.approx(1.0)
    assert temperatures == pytest.approx([0.2 + 0.8 * n / 4 for n in (4, 3, 2, 1)])  # never t_min itself


def test_a_constant_temperature_is_used_by_every_pass(model, tokenizer, prompt):
    events = list(stream_generate(model, tokenizer, prompt, steps=3, max_new_tokens=16, seed=0, temp=0.7,
                                  confidence_threshold=1e-30))
    assert [e.temperature for e in events if isinstance(e, PassEvent)] == pytest.approx([0.7] * 3)


@pytest.mark.parametrize("seed", [-1, None])
def test_seed_minus_one_means_random(model, tokenizer, prompt, seed):
    runs = [generate(model, tokenizer, prompt, steps=2, max_new_tokens=16, seed=seed).tokens for _ in range(2)]
    assert runs[0] != runs[1]


@pytest.mark.parametrize("seed", [0, 2**63, 2**64 - 1])
def test_seeds_up_to_two_to_the_64_are_reproducible(model, tokenizer, prompt, seed):
    runs = [generate(model, tokenizer, prompt, steps=2, max_new_tokens=16, seed=seed).tokens for _ in range(2)]
    assert runs[0] == runs[1]


@pytest.mark.parametrize("seed", [-2, 2**64, "x", 1.5, True])
def test_bad_seeds_are_rejected_before_any_work(model, tokenizer, prompt, seed):
    with pytest.raises(DGemmaError, match="seed"):
        next(stream_generate(model, tokenizer, prompt, seed=seed))


@pytest.mark.parametrize(
    "bad",
    [dict(steps=0), dict(steps=-3), dict(t_min=0.8, t_max=0.8), dict(t_min=0.9, t_max=0.4),
     dict(entropy_bound=0), dict(entropy_bound=-1.0), dict(max_new_tokens=0)],
)
def test_bad_settings_are_one_line_errors(model, tokenizer, prompt, bad):
    with pytest.raises(DGemmaError) as e:
        list(stream_generate(model, tokenizer, prompt, **bad))
    assert "\n" not in str(e.value)


def test_empty_prompt_is_an_error(model, tokenizer):
    with pytest.raises(DGemmaError, match="empty"):
        build_prompt(tokenizer, "   ")
    with pytest.raises(DGemmaError, match="empty"):
        list(stream_generate(model, tokenizer, []))


class _NoTemplate:
    """A tokenizer without a chat template (a base model's), otherwise the tiny one."""

    has_chat_template, chat_template = False, None

    def __init__(self, tokenizer):
        self.encode = tokenizer.encode


def test_without_a_chat_template_the_prompt_is_raw_text_and_thinking_is_an_error(tokenizer):
    base = _NoTemplate(tokenizer)
    assert build_prompt(base, "hi", system="Be brief.") == list(tokenizer.encode("Be brief.\n\nhi"))
    with pytest.raises(DGemmaError, match="thinking needs the chat template, and this model has none"):
        build_prompt(base, "hi", think=True)
    with pytest.raises(DGemmaError, match="it is turned off"):
        build_prompt(tokenizer, "hi", think=True, chat_template=False)
    assert build_prompt(tokenizer, "hi", think=True)  # with the template it is allowed


def test_a_conversation_without_a_chat_template_is_a_one_line_error(tokenizer):
    from dgemma_mlx.generate import render_chat

    with pytest.raises(DGemmaError, match="no chat template") as e:
        render_chat(_NoTemplate(tokenizer), [{"role": "user", "content": "hi"}], think=False)
    assert "\n" not in str(e.value)


def test_prompt_longer_than_the_context_is_an_error(model, tokenizer):
    too_long = [5] * model.args.max_position_embeddings
    with pytest.raises(DGemmaError, match="context"):
        list(stream_generate(model, tokenizer, too_long))


def test_thought_and_answer_are_returned_apart(model, tokenizer, prompt):
    """Force the first canvas to spell <|channel>thought\\n…<channel|>answer, then EOS."""
    tok = tokenizer
    words = lambda text: tok.encode(text, add_special_tokens=False)  # noqa: E731
    seq = [100, tok.convert_tokens_to_ids("thought"), *words("\nhm"), 101, *words("Ok."), 106]
    assert len(seq) <= model.args.canvas_length

    class Forced:
        def __init__(self, m):
            self.m = m

        def __getattr__(self, name):
            return getattr(self.m, name)

        def denoise(self, canvas, cache, sc=None, **kw):
            logits = self.m.denoise(canvas, cache, sc, **kw)
            bump = np.zeros(logits.shape, np.float32)
            for i, t in enumerate(seq):
                bump[0, i, t] = 1e4
            return logits + mx.array(bump)

    end = generate(Forced(model), tokenizer, prompt, **SETTINGS)
    assert end.thought == "hm" and end.text == "Ok."
    assert end.finish_reason == "eos"
