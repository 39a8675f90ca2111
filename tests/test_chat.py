"""`dgemma chat`: a multi-turn session that keeps its prefix cache across turns, and its REPL.

Everything runs on the tiny random float32 checkpoint of ``conftest.py`` with few denoising passes,
so replies are gibberish; what matters is what gets encoded, what the cache holds and how the
session behaves.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from rich.console import Console

import dgemma_mlx.chat.session as chat  # where the session calls stream_generate
from dgemma_mlx.cache import FullAttentionCache
from dgemma_mlx.channels import ChannelSplitter
from dgemma_mlx.chat import ChatRepl, ChatSession, parse_params, run_repl
from dgemma_mlx.errors import DGemmaError
from dgemma_mlx.events import CommitEvent, EndEvent, GenerationStats, PassEvent
from dgemma_mlx.generate import default_settings, render_chat
from dgemma_mlx.render import PlainView

QUESTIONS = ["the sky is blue", "is the sky blue?", "a blue sky", "the sky is a sky", "blue"]
FAST = dict(steps=3, max_new_tokens=32, seed=0)  # two 16-token blocks per reply (unless EOS)


def make_session(model, tokenizer, **kwargs) -> ChatSession:
    settings = default_settings(model).update(**{**FAST, **kwargs.pop("settings", {})})
    return ChatSession(model, tokenizer, settings=settings, **kwargs)


def logit_gap(model, cache, ids: list[int], seed: int = 0) -> float:
    """Max |denoise logits| difference between ``cache`` and a fresh cache that encoded ``ids``
    in one go (same random canvas and self-conditioning logits)."""
    C, V = model.args.canvas_length, model.args.vocab_size
    k1, k2 = mx.random.split(mx.random.key(seed))
    canvas = mx.random.randint(0, V, (1, C), key=k1)
    sc = 3.0 * mx.random.normal((1, C, V), key=k2)
    a = model.denoise(canvas, cache, sc)
    b = model.denoise(canvas, _prefilled(model, ids), sc)
    return float(mx.abs(a - b).max().item())


def _prefilled(model, ids: list[int]):
    cache = model.make_cache()
    model.encode(mx.array(ids, dtype=mx.int32)[None], cache)
    return cache


def consistent(session: ChatSession) -> bool:
    """The cache length, the ids it claims to hold and every full-attention layer agree."""
    n = session.cache.offset
    return len(session.ids) == n and all(
        c.offset == n for c in session.cache.layers if isinstance(c, FullAttentionCache)
    )


def rendered(tokenizer, messages, *, gen: bool, think: bool = False) -> list[int]:
    return render_chat(tokenizer, messages, think=think, add_generation_prompt=gen)


def run_events(events) -> tuple[EndEvent, int]:
    """Consume a reply; return the end event and the reply tokens encoded into the cache."""
    end, encoded = None, 0
    for event in events:
        if isinstance(event, CommitEvent) and event.encoded:
            encoded += len(event.tokens)
        if isinstance(event, EndEvent):
            end = event
    return end, encoded


# -- encoding work -----------------------------------------------------------------------------------


def test_each_turn_encodes_only_its_new_tokens_not_the_conversation(model, tokenizer, monkeypatch):
    session = make_session(model, tokenizer)
    counts: list[int] = []
    real_encode = model.encode

    def counting_encode(ids, cache, *args, **kwargs):
        counts[-1] += ids.shape[-1]
        return real_encode(ids, cache, *args, **kwargs)

    monkeypatch.setattr(model, "encode", counting_encode)
    shared = 0  # tokens of the previous turn's checkpoint: conversation up to its user turn
    rows = []
    for n, question in enumerate(QUESTIONS, 1):
        history = session.messages
        target = rendered(tokenizer, history + [{"role": "user", "content": question}], gen=True)
        counts.append(0)
        end, reply_encoded = run_events(session.send(question))
        assert end.finish_reason != "cancelled"
        new = len(target) - shared
        rows.append((n, len(target), new, reply_encoded, counts[-1]))
        # Exactly the new tokens: the previous reply as the template renders it, this user turn and
        # the generation prompt (plus the reply's own committed blocks during generation).
        assert counts[-1] == new + reply_encoded
        if n >= 4:
            before_last_exchange = rendered(tokenizer, history[:-2], gen=False)  # turns 1 .. n-2
            assert counts[-1] - reply_encoded <= len(target) - len(before_last_exchange)
        shared = len(rendered(tokenizer, session.messages[:-1], gen=False))
    print("\nturn, conversation tokens, new tokens, reply blocks encoded, encoded total")
    for row in rows:
        print(*row)
    # The conversation grows; the work per turn does not.
    assert rows[-1][1] > 3 * rows[1][1] / 2
    assert [t.total_encoded for t in session.stats.per_turn] == [r[4] for r in rows]


# -- the cache is the conversation --------------------------------------------------------------------


def test_cache_after_n_turns_gives_the_same_logits_as_a_fresh_prefill(model, tokenizer, monkeypatch):
    session = make_session(model, tokenizer, system="You are terse.")
    for question in QUESTIONS[:4]:
        session.reply(question)
    question = QUESTIONS[4]
    conversation = [{"role": "system", "content": "You are terse."}] + session.messages
    expected = rendered(tokenizer, conversation + [{"role": "user", "content": question}], gen=False)
    seen = {}
    real = chat.stream_generate

    def checking_stream_generate(model_, tokenizer_, prompt, *, cache, **kwargs):
        # What the session built over 4 turns, just before generating turn 5.
        seen["ids"] = session.ids
        seen["gap"] = logit_gap(model, cache, expected)
        seen["prompt"] = list(prompt)
        yield from real(model_, tokenizer_, prompt, cache=cache, **kwargs)

    monkeypatch.setattr(chat, "stream_generate", checking_stream_generate)
    session.reply(question)
    print(f"\nmax |logit difference| after 4 turns ({len(expected)} tokens): {seen['gap']:.3g}")
    assert seen["ids"] == expected
    full = rendered(tokenizer, conversation + [{"role": "user", "content": question}], gen=True)
    assert expected + seen["prompt"] == full
    assert seen["gap"] <= 1e-4
    # Control: the comparison does notice a cache that is off by one token.
    perturbed = list(expected)
    perturbed[len(perturbed) // 2] = (perturbed[len(perturbed) // 2] + 1) % model.args.vocab_size
    assert logit_gap(model, _prefilled(model, expected), perturbed) > 1e-2


def test_prefill_brings_the_cache_to_the_rendered_conversation(model, tokenizer):
    session = make_session(model, tokenizer)
    for question in QUESTIONS[:4]:
        session.reply(question)
    encoded = session.prefill()
    expected = rendered(tokenizer, session.messages, gen=False)
    assert session.ids == expected
    # Only the last reply, as the template renders it, is encoded.
    assert encoded == len(expected) - len(rendered(tokenizer, session.messages[:-1], gen=False))
    gap = logit_gap(model, session.cache, expected)
    print(f"\nmax |logit difference| after prefill ({len(expected)} tokens): {gap:.3g}")
    assert gap <= 1e-4


# -- longest common prefix fallback ---------------------------------------------------------------------


class RewritingTokenizer:
    """A tokenizer whose chat template rewrites every user turn but the last one."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, messages, **kwargs):
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = [
            dict(m, content="(earlier) " + m["content"]) if m["role"] == "user" and i != last else m
            for i, m in enumerate(messages)
        ]
        return self._tokenizer.apply_chat_template(messages, **kwargs)


def test_lcp_fallback_when_the_template_rewrites_history_and_verbose_says_so(model, tokenizer):
    rewriting = RewritingTokenizer(tokenizer)
    notices: list[str] = []
    session = make_session(model, rewriting, verbose=True, log=notices.append)
    session.reply(QUESTIONS[0])
    assert not any("rewrote" in n for n in notices)
    session.reply(QUESTIONS[1])
    turn = session.stats.per_turn[-1]
    assert turn.rewound_from is not None and turn.reused < 8  # rewritten at the first user turn
    assert any("rewrote earlier text" in n and "longest common prefix" in n for n in notices)
    session.reply(QUESTIONS[2])
    assert logit_gap(model, session.cache, session.ids) <= 1e-4
    session.prefill()
    expected = render_chat(rewriting, session.messages, think=False, add_generation_prompt=False)
    assert session.ids == expected
    assert logit_gap(model, session.cache, expected) <= 1e-4


def test_a_re_rendered_reply_rewinds_only_to_the_last_checkpoint(model, tokenizer):
    notices: list[str] = []
    session = make_session(model, tokenizer, verbose=True, log=notices.append)
    session.reply(QUESTIONS[0])
    checkpoint = len(rendered(tokenizer, session.messages[:1], gen=False))
    session.reply(QUESTIONS[1])
    turn = session.stats.per_turn[-1]
    assert turn.reused == checkpoint and turn.rewound_from is not None
    assert any("renders the last reply differently" in n for n in notices)


def test_quiet_session_reports_nothing(model, tokenizer):
    session = make_session(model, tokenizer)
    session.reply(QUESTIONS[0])
    session.reply(QUESTIONS[1])
    assert session.notices == []


# -- interruptions ----------------------------------------------------------------------------------


def test_ctrl_c_during_a_reply_keeps_the_committed_answer_and_the_session(model, tokenizer, monkeypatch):
    real_denoise = model.denoise
    start = {}

    def interrupting_denoise(canvas, cache, *args, **kwargs):
        start.setdefault("offset", cache.offset)
        if cache.offset > start["offset"]:  # a block was committed and encoded: stop in the next
            raise KeyboardInterrupt
        return real_denoise(canvas, cache, *args, **kwargs)

    # A reply whose first block has no EOS and some answer text (true for nearly every seed).
    for seed in range(20):
        session = make_session(model, tokenizer, settings=dict(max_new_tokens=64, seed=seed))
        session.reply(QUESTIONS[0])
        start.clear()
        monkeypatch.setattr(model, "denoise", interrupting_denoise)
        events = list(session.send(QUESTIONS[1]))
        monkeypatch.setattr(model, "denoise", real_denoise)
        end = events[-1]
        if end.finish_reason == "cancelled" and end.text:
            break
    assert isinstance(end, EndEvent) and end.finish_reason == "cancelled"
    commits = [e for e in events if isinstance(e, CommitEvent)]
    assert len(commits) == 1 and commits[0].encoded
    assert end.tokens == commits[0].tokens
    assert session.messages[-2:] == [
        {"role": "user", "content": QUESTIONS[1]},
        {"role": "assistant", "content": end.text},
    ]
    assert consistent(session)
    session.reply(QUESTIONS[2])  # the session goes on
    assert len(session.messages) == 6
    assert logit_gap(model, session.cache, session.ids) <= 1e-4


@pytest.mark.parametrize("layers", [2, 6])
def test_ctrl_c_inside_encode_leaves_a_consistent_cache(model, tokenizer, monkeypatch, layers):
    session = make_session(model, tokenizer)
    session.reply(QUESTIONS[0])
    before = session.messages
    real_encode = model.encode

    def half_encode(ids, cache, *args, **kwargs):
        # Some layers append their keys/values, then Ctrl-C arrives before the cache advances.
        h = model._embed(ids)
        for layer, c in list(zip(model.layers, cache.layers))[:layers]:
            h = layer(h, c, cache.offset, encode=True)
        mx.eval(cache.arrays())
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "encode", half_encode)
    end = session.reply(QUESTIONS[1])
    assert end.finish_reason == "cancelled" and end.text == ""
    assert session.messages == before  # nothing was committed: the message is not kept
    assert consistent(session)
    monkeypatch.setattr(model, "encode", real_encode)
    seen = {}
    real = chat.stream_generate

    def checking(model_, tokenizer_, prompt, *, cache, **kwargs):
        seen["gap"] = logit_gap(model, cache, session.ids)
        yield from real(model_, tokenizer_, prompt, cache=cache, **kwargs)

    monkeypatch.setattr(chat, "stream_generate", checking)
    session.reply(QUESTIONS[2])
    assert session.messages[-2]["content"] == QUESTIONS[2]
    assert seen["gap"] <= 1e-4


def test_closing_the_reply_early_cleans_up(model, tokenizer):
    session = make_session(model, tokenizer)
    events = session.send(QUESTIONS[0])
    next(events)
    next(events)
    events.close()  # e.g. the consumer was interrupted
    assert consistent(session)
    assert session.messages == []
    session.reply(QUESTIONS[1])
    assert len(session.messages) == 2


# -- context overflow -------------------------------------------------------------------------------


def smallest_context_that_overflows_on_turn_2(model, tokenizer) -> int:
    """A context that fits turn 1 with a reply block, but not turn 2 even after an empty reply."""
    two = [{"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": ""},
           {"role": "user", "content": QUESTIONS[1]}]
    context = len(rendered(tokenizer, two, gen=True)) + model.args.canvas_length - 1
    assert len(rendered(tokenizer, two[:1], gen=True)) + 2 * model.args.canvas_length <= context
    return context


def test_context_overflow_says_so_and_offers_reset(model, tokenizer, monkeypatch):
    context = smallest_context_that_overflows_on_turn_2(model, tokenizer)
    monkeypatch.setattr(model.args, "max_position_embeddings", context)
    session = make_session(model, tokenizer)
    session.reply(QUESTIONS[0])
    with pytest.raises(DGemmaError, match="/reset") as info:
        session.reply(QUESTIONS[1])
    assert f"context of {context} tokens" in str(info.value)
    assert consistent(session) and len(session.messages) == 2
    session.reset()
    assert session.messages == [] and session.cache.offset == 0
    assert session.reply(QUESTIONS[2]).finish_reason in ("eos", "length")


# -- library API ---------------------------------------------------------------------------------


def test_thoughts_are_not_fed_back_into_history(model, tokenizer, monkeypatch):
    monkeypatch.setattr(chat, "stream_generate", fake_thinking_stream)
    session = make_session(model, tokenizer, think=True)
    end = session.reply(QUESTIONS[0])
    assert end.thought.strip() == "the sky is blue" and end.text.strip() == "a sky"
    assert session.messages[-1] == {"role": "assistant", "content": "a sky"}
    assert consistent(session)


def test_settings_are_validated_and_unchanged_on_error(model, tokenizer):
    session = make_session(model, tokenizer)
    assert session.set_params(steps="16", t_max=0.9).steps == 16
    before = session.settings
    for bad in (dict(steps="abc"), dict(steps=0), dict(t_min=0.95), dict(bogus=1)):
        with pytest.raises(DGemmaError):
            session.set_params(**bad)
        assert session.settings == before
    assert session.set_params(seed="none").seed is None
    assert parse_params("t-max=0.7 max_new_tokens=8") == {"t_max": "0.7", "max_new_tokens": "8"}


def test_save_is_atomic_and_load_round_trips(model, tokenizer, tmp_path, monkeypatch):
    session = make_session(model, tokenizer, system="Be brief.", think=True)
    session.reply(QUESTIONS[0])
    path = tmp_path / "chat.json"
    path.write_text("old")
    session.save(path)
    saved = json.loads(path.read_text())
    assert saved["messages"] == session.messages and saved["system"] == "Be brief." and saved["think"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(DGemmaError, match="No space left"):
        session.save(path)
    monkeypatch.undo()
    assert json.loads(path.read_text()) == saved  # the old transcript is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json"]  # no temporary file left

    other = make_session(model, tokenizer)
    other.load(path)
    assert other.transcript() == session.transcript()
    assert other.reply(QUESTIONS[1]).finish_reason in ("eos", "length")  # the next turn re-encodes
    assert other.messages[:2] == session.messages and consistent(other)


# -- the REPL ----------------------------------------------------------------------------------------


class Script:
    """An input hook for the REPL: returns the given lines (a callable line is called first),
    records each line's output, and raises EOFError (Ctrl-D) at the end."""

    def __init__(self, lines, console: Console):
        self.lines = list(lines)
        self.file = console.file
        self.outputs: list[tuple[str, str]] = []
        self._pos = 0
        self.read = 0

    def _close_output(self) -> None:
        text = self.file.getvalue()
        if self.outputs:
            self.outputs[-1] = (self.outputs[-1][0], text[self._pos :])
        self._pos = len(text)

    def __call__(self, prompt: str) -> str:
        self._close_output()
        if not self.lines:
            raise EOFError
        line = self.lines.pop(0)
        if callable(line):
            line = line()
        self.read += 1
        self.outputs.append((line, ""))
        return line

    def output(self, line: str) -> str:
        self._close_output()
        return "".join(out for cmd, out in self.outputs if cmd == line)


def plain_console() -> Console:
    return Console(file=io.StringIO(), width=200, highlight=False, color_system=None)


def test_scripted_session_exercises_every_command(model, tokenizer, tmp_path, monkeypatch, capsys):
    console = plain_console()
    session = make_session(model, tokenizer)
    real_denoise = model.denoise
    interrupt = {"armed": False, "calls": 0}

    def denoise(canvas, cache, *args, **kwargs):
        if interrupt["armed"]:
            interrupt["calls"] += 1
            if interrupt["calls"] == 2:
                interrupt["armed"] = False
                raise KeyboardInterrupt  # Ctrl-C in the middle of the reply
        return real_denoise(canvas, cache, *args, **kwargs)

    def interrupted_message():
        interrupt["armed"] = True
        return "please stop"

    monkeypatch.setattr(model, "denoise", denoise)
    saved, resaved = tmp_path / "a.json", tmp_path / "b.json"
    script = Script(
        [
            "/help",
            "/params",
            "/params steps=2 max_new_tokens=16 t_max=0.9",
            "the sky is blue",
            "/system You are terse.",
            "/system",
            "/think on",
            "/think hide",
            "is the sky blue?",
            "/think show",
            "/think off",
            interrupted_message,
            "/stats",
            f"/save {saved}",
            "/reset",
            "/stats",
            f"/load {saved}",
            f"/save {resaved}",
            "a blue sky",
            "/exit",
            "never read",
        ],
        console,
    )
    assert run_repl(session, console, input_fn=script) == 0
    assert script.lines == ["never read"]  # /exit left the loop

    assert "/params [NAME=VALUE" in script.output("/help")
    assert "steps=3" in script.output("/params")
    assert "steps=2" in script.output("/params steps=2 max_new_tokens=16 t_max=0.9")
    assert "t_max=0.9" in script.output("/params steps=2 max_new_tokens=16 t_max=0.9")
    script.output("the sky is blue")
    # piped output: the reply's measurements go to stderr, stdout keeps the conversation
    assert "encoded 32 new of 32 conversation tokens" in capsys.readouterr().err
    assert "system prompt: You are terse." in script.output("/system")
    assert "thinking on" in script.output("/think on")
    assert "thoughts hidden" in script.output("/think hide")
    assert "thoughts shown" in script.output("/think show")
    assert "thinking off" in script.output("/think off")
    assert "reply stopped; the message was not added" in script.output("please stop")
    assert "turns: 3 · messages: 4" in script.output("/stats").splitlines()[0]
    assert f"saved 4 messages to {saved}" in script.output(f"/save {saved}")
    assert "new conversation" in script.output("/reset")
    assert f"loaded 4 messages from {saved}" in script.output(f"/load {saved}")
    # save -> load -> save gives the same transcript, and the loaded session continues.
    assert json.loads(saved.read_text()) == json.loads(resaved.read_text())
    transcript = json.loads(saved.read_text())
    assert transcript["system"] == "You are terse." and transcript["think"] is False
    assert transcript["settings"]["steps"] == 2 and transcript["settings"]["t_max"] == 0.9
    assert [m["content"] for m in transcript["messages"] if m["role"] == "user"] == [
        "the sky is blue", "is the sky blue?"
    ]
    assert session.messages[:4] == transcript["messages"]
    assert session.messages[4]["content"] == "a blue sky" and len(session.messages) == 6
    assert consistent(session)
    assert "error" not in console.file.getvalue()


BAD_INPUT = [
    "/frobnicate",
    "/params steps=abc",
    "/params steps=0",
    "/params t_min=0.9 t_max=0.5",
    "/params bogus=1",
    "/params steps",
    "/think maybe",
    "/save",
    "/load",
]


def test_bad_input_gets_a_one_line_error_and_the_session_continues(model, tokenizer, tmp_path):
    not_json = tmp_path / "not.json"
    not_json.write_text("{ nope")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}))
    binary = tmp_path / "binary.json"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    missing = tmp_path / "missing.json"
    loads = [f"/load {missing}", f"/load {not_json}", f"/load {wrong}", f"/load {binary}", f"/load {tmp_path}"]
    console = plain_console()
    session = make_session(model, tokenizer)
    before = session.settings
    script = Script(["the sky is blue", *BAD_INPUT, *loads, "is the sky blue?", "/exit"], console)
    assert run_repl(session, console, input_fn=script) == 0
    for line in BAD_INPUT + loads:
        out = script.output(line)
        assert out.startswith("error: ") and out.count("\n") == 1, (line, out)
    assert "unknown command '/frobnicate'" in script.output("/frobnicate")
    assert "bad value for steps: 'abc'" in script.output("/params steps=abc")
    assert "not valid JSON" in script.output(f"/load {not_json}")
    assert "role 'wizard'" in script.output(f"/load {wrong}")
    assert "cannot read" in script.output(f"/load {missing}")
    assert session.settings == before
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["the sky is blue", "is the sky blue?"]


def test_context_overflow_in_the_repl_is_one_line_and_reset_recovers(model, tokenizer, monkeypatch):
    context = smallest_context_that_overflows_on_turn_2(model, tokenizer)
    monkeypatch.setattr(model.args, "max_position_embeddings", context)
    console = plain_console()
    session = make_session(model, tokenizer)
    script = Script(["the sky is blue", "is the sky blue?", "/reset", "a blue sky", "/exit"], console)
    assert run_repl(session, console, input_fn=script) == 0
    out = script.output("is the sky blue?")
    assert out.startswith("error: ") and "/reset" in out and out.count("\n") == 1
    assert [m["content"] for m in session.messages if m["role"] == "user"] == ["a blue sky"]


def test_ctrl_c_in_the_view_stops_the_reply_and_keeps_the_session(model, tokenizer):
    console = plain_console()
    session = make_session(model, tokenizer)

    class InterruptedView(PlainView):
        def update(self, event):
            if isinstance(event, CommitEvent):  # Ctrl-C while the view draws the first block
                raise KeyboardInterrupt
            super().update(event)

    script = Script(["the sky is blue", "is the sky blue?", "/exit"], console)
    repl = ChatRepl(session, console, input_fn=script, view_factory=lambda tok, con: InterruptedView(tok, con.file))
    assert repl.run() == 0
    assert script.output("the sky is blue").count("reply stopped") == 1
    assert script.output("is the sky blue?").count("reply stopped") == 1
    assert consistent(session)


def test_ctrl_d_leaves_and_ctrl_c_at_the_prompt_is_ignored(model, tokenizer):
    console = plain_console()
    session = make_session(model, tokenizer)
    calls = iter([KeyboardInterrupt, EOFError])

    def keys(prompt):
        raise next(calls)

    assert run_repl(session, console, input_fn=keys) == 0
    assert "Ctrl-D to leave" in console.file.getvalue()


def fake_thinking_stream(model, tokenizer, prompt, *, cache, settings=None, **kwargs):
    """A generation that thinks "the sky is blue" and answers "a sky" (encodes its prompt as
    stream_generate does)."""
    model.encode(mx.array(list(prompt), dtype=mx.int32)[None], cache)
    thought = tokenizer.encode("thought\nthe sky is blue", add_special_tokens=False)
    answer = tokenizer.encode("a sky", add_special_tokens=False)
    tokens = [100, *thought, 101, *answer]
    segments = ChannelSplitter(tokenizer).commit(tokens, final=True)  # as the generator splits them
    C = model.args.canvas_length
    yield PassEvent(block=0, step=1, max_steps=1, temperature=0.4, canvas=(tokens + [0] * C)[:C],
                    accepted=[True] * C, entropy=[0.0] * C, mean_entropy=0.0, stopped=True, elapsed=0.0)
    yield CommitEvent(block=0, tokens=tokens, text="a sky", steps=1, eos=True, finished=True, encoded=False,
                      thought="the sky is blue", segments=segments)
    yield EndEvent(text="a sky", tokens=tokens, finish_reason="eos", stats=GenerationStats(), thought="the sky is blue")


def test_thoughts_are_dim_on_a_terminal_and_collapse_with_think_hide(model, tokenizer, monkeypatch):
    monkeypatch.setattr(chat, "stream_generate", fake_thinking_stream)
    console = Console(file=io.StringIO(), width=100, height=30, force_terminal=True, color_system="truecolor",
                      record=True)
    session = make_session(model, tokenizer, think=True)
    script = Script(["why?", "/think hide", "why not?", "/exit"], console)
    assert run_repl(session, console, input_fn=script) == 0
    shown, hidden = console.file.getvalue().split("thoughts hidden", 1)
    assert "thinking\x1b[0m\n\x1b[2;3mthe sky is blue\x1b[0m\n\na sky\n" in shown  # dim italic, then the answer
    assert "the sky is blue" not in hidden
    assert hidden.index("(thinking… hidden: /think show)") < hidden.rindex("a sky\n")
    assert [m["content"] for m in session.messages if m["role"] == "assistant"] == ["a sky", "a sky"]


# -- the real thing, in a pseudo-terminal ------------------------------------------------------------------


def dgemma_executable() -> str:
    exe = Path(sys.executable).with_name("dgemma")
    return str(exe) if exe.exists() else shutil.which("dgemma") or pytest.skip("dgemma is not installed")


def test_dgemma_chat_in_a_pseudo_terminal(checkpoint, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    history = tmp_path / "history"
    env = dict(
        os.environ,
        DGEMMA_HISTORY=str(history),
        PROMPT_TOOLKIT_NO_CPR="1",
        TERM="xterm-256color",
        HF_HUB_OFFLINE="1",
    )
    args = ["chat", "--model", str(checkpoint), "--steps", "2", "--max-new-tokens", "16", "--seed", "0"]
    child = pexpect.spawn(dgemma_executable(), args, env=env, encoding="utf-8", timeout=90, dimensions=(30, 100))
    try:
        child.expect("Ctrl-D to leave")
        child.expect(">")
        child.sendline("the sky is blue")
        child.expect("tok/s")  # the reply, then its stats line
        child.expect(">")
        child.sendline("/stats")
        child.expect("turns: 1")
        child.expect(">")
        child.send("\x1b[A")  # up-arrow recalls /stats
        child.sendline("")
        child.expect("turns: 1")
        child.expect(">")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    assert "the sky is blue" in history.read_text()


def test_params_seed_minus_one_is_random_and_a_bad_seed_changes_nothing(model, tokenizer):
    console = plain_console()
    session = make_session(model, tokenizer)
    script = Script(["/params seed=-1", "the sky is blue", f"/params seed={2**64}", "/params seed=-7",
                     "is the sky blue?", "/exit"], console)
    assert run_repl(session, console, input_fn=script) == 0
    assert "seed=random" in script.output("/params seed=-1")
    for bad in (f"/params seed={2**64}", "/params seed=-7"):
        out = script.output(bad)
        assert out.startswith("error: ") and "seed" in out and out.count("\n") == 1
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2  # both messages answered
    assert session.settings.seed is None


def test_params_temp_sets_a_constant_temperature(model, tokenizer):
    session = make_session(model, tokenizer)
    settings = session.set_params(**parse_params("temp=0.6"))
    assert (settings.t_min, settings.t_max, settings.temp) == (0.6, 0.6, 0.6)
    assert session.set_params(**parse_params("t_max=0.9")).temp is None  # a schedule again


def test_a_non_utf8_line_on_stdin_is_skipped_with_one_error(model, tokenizer, monkeypatch):
    console = plain_console()
    session = make_session(model, tokenizer)
    stdin = io.TextIOWrapper(io.BytesIO(b"caf\xe9\n/params steps=2\n/exit\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert run_repl(session, console) == 0
    out = console.file.getvalue()
    assert "error: the line is not valid UTF-8" in out and "steps=2" in out and session.messages == []


@pytest.mark.parametrize("flags, history", [([], True), (["--no-history"], None)])
def test_no_history_keeps_the_input_history_off_disk(checkpoint, monkeypatch, flags, history):
    import dgemma_mlx.chat
    from dgemma_mlx.cli import main

    seen = {}
    monkeypatch.setattr(dgemma_mlx.chat, "run_repl", lambda session, console, **kw: seen.update(kw) or 0)
    assert main(["chat", "--model", str(checkpoint), *flags]) == 0
    assert seen.get("history_file", True) is history
