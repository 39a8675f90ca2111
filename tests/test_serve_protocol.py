"""The server's parts without HTTP: request parsing, reply assembly (thought, answer, stop strings)
and the generation worker's queue and prefix-cache reuse."""

from __future__ import annotations

import threading

import pytest

from dgemma_mlx.events import CommitEvent, EndEvent
from dgemma_mlx.generate import GenerationSettings, build_prompt, default_settings, generate, render_chat
from dgemma_mlx.infill import InfillEnd
from dgemma_mlx.serve.protocol import APIError, parse_chat, parse_completion
from dgemma_mlx.serve.reply import Reply, StopFilter
from dgemma_mlx.serve.worker import Finished, GenerationWorker, Job, QueueFull, Started
from tiny import enc

DEFAULTS = GenerationSettings()


def user(text="hi"):
    return {"role": "user", "content": text}


# -------------------------------------------------------------------------------------- parsing


def test_chat_request_takes_diffusion_settings_as_extra_fields():
    req = parse_chat({"model": "m", "messages": [user()], "steps": 12, "entropy_bound": 0.2, "t_min": 0.1,
                      "t_max": 0.9, "seed": 4, "max_tokens": 64, "think": True}, "m", DEFAULTS)
    s = req.settings
    assert (s.steps, s.entropy_bound, s.t_min, s.t_max, s.seed, s.max_new_tokens) == (12, 0.2, 0.1, 0.9, 4, 64)
    assert req.think and not req.stream


@pytest.mark.parametrize("top_k, expected", [(64, 64), (-1, None), (0, None)])
def test_fast_sampling_comes_as_extra_fields_with_vllms_top_k(top_k, expected):
    req = parse_chat({"model": "m", "messages": [user()], "top_k": top_k, "freeze_accepted": True,
                      "short_canvas": True}, "m", DEFAULTS)
    assert req.settings.top_k == expected and req.settings.freeze_accepted is True and req.settings.short_canvas


def test_max_completion_tokens_wins_over_max_tokens():
    req = parse_chat({"model": "m", "messages": [user()], "max_tokens": 10, "max_completion_tokens": 20}, "m", DEFAULTS)
    assert req.settings.max_new_tokens == 20


def test_text_parts_are_joined_and_developer_is_a_system_turn():
    req = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be terse"},
        {"role": "user", "content": [{"type": "text", "text": "the sky "}, {"type": "text", "text": "is"}]},
    ]}, "m", DEFAULTS)
    assert req.messages == [{"role": "system", "content": "be terse"}, {"role": "user", "content": "the sky is"}]


def test_sampling_fields_this_model_does_not_use_are_accepted_and_ignored():
    req = parse_chat({"model": "m", "messages": [user()], "temperature": 0.2, "top_p": 0.5, "user": "u",
                      "presence_penalty": 1.0}, "m", DEFAULTS)
    assert req.settings == DEFAULTS


@pytest.mark.parametrize("field, value", [("seed", True), ("seed", 1.5), ("seed", -1), ("steps", "4"), ("think", "yes"),
                                          ("top_k", 2.5), ("freeze_accepted", "yes"), ("short_canvas", 1),
                                          ("stream", 1), ("logprobs", True), ("tools", [{"type": "function"}])])
def test_wrongly_typed_or_unsupported_fields_are_400s_naming_the_field(field, value):
    with pytest.raises(APIError) as e:
        parse_chat({"model": "m", "messages": [user()], field: value}, "m", DEFAULTS)
    assert e.value.status == 400 and e.value.param == field


def test_completion_prompt_may_be_text_token_ids_or_a_batch_of_one():
    assert parse_completion({"model": "m", "prompt": "abc"}, "m", DEFAULTS).prompt == "abc"
    assert parse_completion({"model": "m", "prompt": [5, 6]}, "m", DEFAULTS).prompt == [5, 6]
    assert parse_completion({"model": "m", "prompt": ["abc"]}, "m", DEFAULTS).prompt == "abc"
    for bad in (["a", "b"], [], "", [1, -1], None):
        with pytest.raises(APIError):
            parse_completion({"model": "m", "prompt": bad}, "m", DEFAULTS)


# ---------------------------------------------------------------------------------- stop strings


def test_stop_filter_finds_a_stop_string_across_pieces():
    f = StopFilter(["END"])
    assert f.feed("the sky E") == "the sky "  # "E" could start "END": held back
    assert f.feed("N") == ""
    assert f.feed("D and more") == "" and f.stopped


def test_stop_filter_releases_a_held_back_tail_that_did_not_become_a_stop_string():
    f = StopFilter(["END"])
    assert f.feed("a blue EN") == "a blue "
    assert f.feed("TRY") == "ENTRY"
    assert f.feed("EN", final=True) == "EN" and not f.stopped


def test_stop_filter_cuts_at_the_earliest_of_several_stop_strings():
    f = StopFilter(["sky", "the"])
    assert f.feed("a the blue sky") == "a " and f.stopped


# ------------------------------------------------------------------------------------ the reply


def commit(tokens, finished=False, steps=2):
    return CommitEvent(block=0, tokens=tokens, text="", steps=steps, eos=False, finished=finished,
                       encoded=not finished)


def test_chat_reply_sends_the_thought_as_reasoning_content(tok):
    reply = Reply(tok, chat=True, stops=[])
    first = reply.commit(commit([100] + enc(tok, "thought\nthe sky")))
    second = reply.commit(commit([101] + enc(tok, "blue"), finished=True))
    assert first.pieces == [("reasoning_content", "the sky")]
    assert second.pieces == [("content", "blue")]
    assert (reply.reasoning, reply.content) == ("the sky", "blue")
    end = reply.end(EndEvent(text="blue", tokens=[], finish_reason="eos"))
    assert end.finish_reason == "stop" and reply.passes == 4 and reply.blocks == 2


def test_stop_strings_apply_to_the_answer_not_the_thought(tok):
    reply = Reply(tok, chat=True, stops=["sky"])
    reply.commit(commit([100] + enc(tok, "thought\nthe sky") + [101] + enc(tok, "a blue")))
    last = reply.commit(commit(enc(tok, " sky is"), finished=False))
    assert reply.reasoning == "the sky" and reply.content == "a blue "
    assert last.finish_reason == "stop" and reply.done


def test_length_finish_reason(tok):
    reply = Reply(tok, chat=False, stops=[])
    reply.commit(CommitEvent(block=0, tokens=[5], text="x", steps=1, eos=False, finished=True, encoded=False))
    assert reply.end(EndEvent(text="x", tokens=[5], finish_reason="length")).finish_reason == "length"
    assert reply.content == "x"


def test_an_infill_reply_is_the_fill_and_stops_where_the_model_ended_it(tok):
    reply = Reply(tok, chat=False, stops=[], eos_ids=[1], fill=(0, 4))
    sky = enc(tok, " sky")
    canvas = sky + [1] * (4 - len(sky)) + enc(tok, " blue")
    assert reply.commit(commit(canvas, finished=True)).pieces == []  # pinned text is not the answer
    end = reply.end(InfillEnd(text="the sky blue", tokens=canvas, finish_reason="length", fills=[" sky"]))
    assert end.pieces == [("content", " sky")] and end.finish_reason == "stop"
    assert reply.completion_tokens == len(sky) and reply.passes == 2


# ------------------------------------------------------------------------------------ the worker


def run_job(worker, ids, split, settings) -> tuple[Started, list]:
    events, done = [], threading.Event()

    def on_event(e):
        events.append(e)
        if isinstance(e, Finished):
            done.set()

    worker.submit(Job(ids, split, settings, on_event))
    assert done.wait(60)
    assert events[-1] == Finished("done")
    return events[0], events[1:-1]


def chat_job(tokenizer, messages):
    ids = render_chat(tokenizer, messages, think=False)
    base = render_chat(tokenizer, messages, think=False, add_generation_prompt=False)
    return ids, len(base)


@pytest.mark.parametrize("cache_bytes, reused", [(1 << 30, True), (0, False)])
def test_worker_reuses_the_conversation_prefix_within_its_memory_bound(model, tokenizer, cache_bytes, reused):
    settings = default_settings(model).update(steps=2, max_new_tokens=32, seed=0)
    worker = GenerationWorker(model, tokenizer, cache_bytes=cache_bytes).start()
    try:
        turn1 = [user("the sky is blue")]
        ids, split = chat_job(tokenizer, turn1)
        started, events = run_job(worker, ids, split, settings)
        assert started == Started(len(ids), 0)
        assert events[-1].text == generate(model, tokenizer, build_prompt(tokenizer, "the sky is blue"),
                                           settings=settings).text
        turn2 = turn1 + [{"role": "assistant", "content": events[-1].text.strip()}, user("is it?")]
        ids2, split2 = chat_job(tokenizer, turn2)
        started2, _ = run_job(worker, ids2, split2, settings)
        assert started2.cached_tokens == (split if reused else 0)
        assert worker.counts == {"completed": 2, "cancelled": 0, "failed": 0}
    finally:
        worker.close()


def test_worker_refuses_jobs_beyond_its_queue(model, tokenizer):
    worker = GenerationWorker(model, tokenizer, max_queue=2)  # not started: nothing leaves the queue
    ids = build_prompt(tokenizer, "hi")
    for _ in range(2):
        worker.submit(Job(ids, 0, DEFAULTS, lambda e: None))
    with pytest.raises(QueueFull):
        worker.submit(Job(ids, 0, DEFAULTS, lambda e: None))


def test_a_generation_error_is_reported_and_the_worker_keeps_serving(model, tokenizer):
    worker = GenerationWorker(model, tokenizer).start()
    try:
        events, done = [], threading.Event()
        too_long = [5] * (model.args.max_position_embeddings - 4)
        worker.submit(Job(too_long, 0, DEFAULTS, lambda e: (events.append(e), isinstance(e, Finished) and done.set())))
        assert done.wait(60)
        assert events[-1].status == "error" and events[-1].user_error and "context" in events[-1].message
        settings = default_settings(model).update(steps=1, max_new_tokens=16, seed=0)
        run_job(worker, build_prompt(tokenizer, "hi"), 0, settings)
        assert worker.counts == {"completed": 1, "cancelled": 0, "failed": 1}
    finally:
        worker.close()
