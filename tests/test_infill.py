"""Infilling and editing: holes, plans, pinned text kept, scores, the `infill` and `edit` commands."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys

import numpy as np
import pexpect
import pytest

from dgemma_mlx import DGemmaError
from dgemma_mlx.events import PassEvent
from dgemma_mlx.files import atomic_write_text
from dgemma_mlx.infill import (
    INFILL_REQUEST,
    InfillEnd,
    edit,
    infill,
    line_range,
    parse_holes,
    plan_infill,
    stream_edit,
    stream_infill,
)
from test_cli import restore_sigint
from tiny import DenoiseSpy

FAST = dict(steps=3, seed=1)
EOS = 1  # the tiny tokenizer's <eos>


def words(tokenizer, text):
    return list(tokenizer.encode(text, add_special_tokens=False))


def test_holes_split_the_text_and_carry_their_lengths():
    pieces, lengths = parse_holes("a<|fill|>b<|fill:7|>c<|fill: 2 |>")
    assert pieces == ["a", "b", "c", ""] and lengths == [None, 7, 2]


@pytest.mark.parametrize(
    "text, words_",
    [("no hole here", "no hole"), ("x <|fill:0|> y", "at least 1"), ("x <|fill:-3|>", "at least 1"),
     ("x <|fill:ab|>", "whole number")],
)
def test_bad_holes_are_one_line_errors(text, words_):
    with pytest.raises(DGemmaError, match=words_) as e:
        parse_holes(text)
    assert "\n" not in str(e.value)


def test_a_plan_pins_the_text_between_holes_and_the_end_of_the_text(model, tokenizer):
    C = model.args.canvas_length
    plan = plan_infill(model, tokenizer, ["the sky", " is", " blue"], [3, 20])
    between, after = words(tokenizer, " is"), words(tokenizer, " blue")
    assert plan.prompt == list(tokenizer.encode("the sky"))
    assert plan.holes == [(0, 3), (3 + len(between), 3 + len(between) + 20)]
    end = plan.holes[1][1]
    expected = [-1] * 3 + between + [-1] * 20 + after + [EOS] * (2 * C - end - len(after))
    assert plan.pinned == expected and plan.max_new_tokens == 2 * C and plan.warm_start is None


def test_a_hole_longer_than_the_context_allows_is_a_one_line_error(model, tokenizer):
    with pytest.raises(DGemmaError, match="more than the model's context of 4096") as e:
        infill(model, tokenizer, "the sky <|fill:4090|> blue", **FAST)
    assert "\n" not in str(e.value)


def test_infill_keeps_the_text_fills_the_holes_and_pins_every_pass(model, tokenizer):
    text = "the sky <|fill:3|> is<|fill:20|> blue"
    events = list(stream_infill(model, tokenizer, text, **FAST))
    end = events[-1]
    assert isinstance(end, InfillEnd) and len(end.fills) == 2
    assert end.text == "the sky " + end.fills[0] + " is" + end.fills[1] + " blue"
    plan = plan_infill(model, tokenizer, ["the sky ", " is", " blue"], [3, 20])
    C = model.args.canvas_length
    passes = [e for e in events if isinstance(e, PassEvent)]
    assert {p.block for p in passes} == {0, 1}
    for p in passes:
        block = plan.pinned[p.block * C : (p.block + 1) * C]
        assert p.pinned == [t >= 0 for t in block]
        assert all(c == t for c, t in zip(p.canvas, block) if t >= 0)
    # the fills are the final passes' hole tokens, decoded
    finals = {p.block: p for p in passes}
    tokens = finals[0].canvas + finals[1].canvas
    (a, b), _ = plan.holes
    assert end.fills[0] == tokenizer.decode(tokens[a:b], skip_special_tokens=True)


def test_the_score_is_the_mean_final_log_probability_of_the_hole_tokens(model, tokenizer):
    events = list(stream_infill(model, tokenizer, "the sky <|fill:5|> blue", **FAST))
    last = [e for e in events if isinstance(e, PassEvent)][-1]
    assert events[-1].score == pytest.approx(float(np.mean(last.logprob[:5])))
    assert all(x <= 0 for x in last.logprob)


def test_several_lengths_keep_the_best_scoring_one(model, tokenizer):
    end = infill(model, tokenizer, "the sky <|fill|> blue <|fill:2|>.", lengths=[2, 5, 9], **FAST)
    assert [a["fill_length"] for a in end.attempts] == [2, 5, 9]
    best = max(end.attempts, key=lambda a: a["score"])
    assert end.fill_length == best["fill_length"] and end.score == best["score"]
    alone = infill(model, tokenizer, "the sky <|fill|> blue <|fill:2|>.", fill_length=best["fill_length"], **FAST)
    assert alone.text == end.text


def test_several_lengths_need_a_default_length_hole(model, tokenizer):
    with pytest.raises(DGemmaError, match="<\\|fill\\|> hole"):
        infill(model, tokenizer, "a <|fill:3|> b", lengths=[2, 3])


def test_chat_mode_asks_for_the_text_with_its_gaps(model, tokenizer):
    plan = plan_infill(model, tokenizer, ["Say ", " now"], [4], chat=True)
    prompt = tokenizer.decode(plan.prompt)
    assert INFILL_REQUEST.format(gap="[___]", text="Say [___] now") in prompt
    assert prompt.endswith("<channel|>Say ")
    assert plan.pinned[4 + len(words(tokenizer, " now"))] == tokenizer.convert_tokens_to_ids("<turn|>")
    end = infill(model, tokenizer, "Say <|fill:4|> now", chat=True, **FAST)
    assert end.text.startswith("Say ") and end.text.endswith(" now")


def test_edit_warm_starts_from_the_current_lines_and_keeps_the_rest(model, tokenizer):
    text = "first line\nthe sky is blue\nlast line\n"
    current = words(tokenizer, "the sky is blue")
    spy = DenoiseSpy(model)
    end = edit(spy, tokenizer, text, (2, 2), **FAST)
    assert spy.canvases[0][: len(current)] == current
    assert end.text.startswith("first line\n") and end.text.endswith("\nlast line\n")
    assert end.text == "first line\n" + end.fills[0] + "\nlast line\n"


def test_edit_with_an_instruction_uses_the_chat_template(model, tokenizer):
    events = list(stream_edit(model, tokenizer, "a\nb\n", (1, 1), instruction="shout", **FAST))
    assert events[-1].text.endswith("\nb\n")
    with pytest.raises(DGemmaError, match="empty"):
        edit(model, tokenizer, "a\nb\n", (1, 1), instruction="  ")


@pytest.mark.parametrize("lines", [(3, 3), (0, 1), (2, 5)])
def test_edit_lines_outside_the_text_are_an_error(model, tokenizer, lines):
    with pytest.raises(DGemmaError, match="outside"):
        edit(model, tokenizer, "a\nb\n", lines)


@pytest.mark.parametrize("spec, words_", [("x", "A-B"), ("3-2", "A <= B"), ("0-1", "A <= B")])
def test_bad_line_ranges_are_one_line_errors(spec, words_):
    with pytest.raises(DGemmaError, match=words_):
        line_range(spec)
    assert line_range("4") == (4, 4) and line_range(" 2 - 7 ") == (2, 7)


def test_atomic_write_keeps_the_mode_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "f.py"
    path.write_text("old\n")
    path.chmod(0o751)
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and stat.S_IMODE(path.stat().st_mode) == 0o751
    assert os.listdir(tmp_path) == ["f.py"]


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "f.py"
    path.write_text("old\n")
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(DGemmaError, match="No space left"):
        atomic_write_text(path, "new\n")
    assert path.read_text() == "old\n" and os.listdir(tmp_path) == ["f.py"]


# -- the command line -------------------------------------------------------------------------

ARGS = ["--steps", "3", "--seed", "1"]


def dgemma(*args, input=None):
    return subprocess.run([sys.executable, "-m", "dgemma_mlx", *args], input=input, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "100"})


def one_line_error(r, *words_):
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and len(lines) == 1 and lines[0].startswith("dgemma: error:"), r.stderr
    assert all(w in lines[0] for w in words_), lines[0]


def test_infill_command_prints_the_whole_filled_text(checkpoint, model, tokenizer, tmp_path):
    text = "the sky <|fill:3|> is blue"
    expected = infill(model, tokenizer, text, **FAST).text
    r = dgemma("infill", "-m", str(checkpoint), *ARGS, text)
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected and "score" in r.stderr
    path = tmp_path / "in.txt"
    path.write_text(text)
    from_file = dgemma("infill", "-m", str(checkpoint), *ARGS, str(path))
    from_stdin = dgemma("infill", "-m", str(checkpoint), *ARGS, input=text)
    assert from_file.stdout == from_stdin.stdout == expected


def test_infill_events_carry_the_pinned_mask(checkpoint, tmp_path):
    path = tmp_path / "events.jsonl"
    r = dgemma("infill", "-m", str(checkpoint), *ARGS, "--events", str(path), "the sky <|fill:3|> is blue")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in path.read_text().splitlines()]
    first = events[0]
    assert first["pinned"][:3] == [False] * 3 and all(first["pinned"][3:])
    assert events[-1]["type"] == "end" and events[-1]["text"] == r.stdout


@pytest.mark.parametrize(
    "args, words_",
    [(["no hole here"], ["no hole"]), (["a <|fill:0|>"], ["at least 1"]),
     (["a <|fill:9000|>"], ["context"]), (["--fill-length", "0", "a <|fill|>"], ["fill-length"])],
)
def test_infill_bad_input_is_a_one_line_error(checkpoint, args, words_):
    one_line_error(dgemma("infill", "-m", str(checkpoint), *args), *words_)


def test_unreadable_files_are_one_line_errors(checkpoint, tmp_path):
    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\xff\xfe\x00<|fill|>")
    one_line_error(dgemma("infill", "-m", str(checkpoint), str(binary)), "cannot read", "not UTF-8")
    one_line_error(dgemma("edit", "-m", str(checkpoint), str(binary), "--lines", "1-1"), "cannot read")
    one_line_error(dgemma("edit", "-m", str(checkpoint), str(tmp_path), "--lines", "1-1"), "directory")
    one_line_error(dgemma("edit", "-m", str(checkpoint), str(tmp_path / "missing.py"), "--lines", "1-1"),
                   "cannot read", "No such file")
    one_line_error(dgemma("infill", "-m", str(checkpoint), str(tmp_path / "missing.py")), "no hole", "no file")
    locked = tmp_path / "locked.txt"
    locked.write_text("a <|fill|>")
    locked.chmod(0)
    if not os.access(locked, os.R_OK):  # (root reads it anyway)
        one_line_error(dgemma("infill", "-m", str(checkpoint), str(locked)), "cannot read")


def test_edit_command_prints_or_rewrites_in_place(checkpoint, model, tokenizer, tmp_path):
    text = "def f(x):\n    return x + 1\n\nprint(f(2))\n"
    expected = edit(model, tokenizer, text, (2, 2), **FAST).text
    path = tmp_path / "f.py"
    path.write_text(text)
    path.chmod(0o640)
    r = dgemma("edit", "-m", str(checkpoint), *ARGS, str(path), "--lines", "2-2")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected and path.read_text() == text
    r = dgemma("edit", "-m", str(checkpoint), *ARGS, str(path), "--lines", "2", "--in-place")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and path.read_text() == expected
    assert stat.S_IMODE(path.stat().st_mode) == 0o640 and os.listdir(tmp_path) == ["f.py"]


def test_in_place_edit_of_a_crlf_file_keeps_its_line_ends(checkpoint, model, tokenizer, tmp_path):
    # The model sees LF; every line is written back with CRLF, those outside the range byte for byte.
    text = "def f(x):\n    return x + 1\n\nprint(f(2))\n"
    expected = edit(model, tokenizer, text, (2, 2), **FAST).text
    path = tmp_path / "f.py"
    path.write_bytes(text.replace("\n", "\r\n").encode())
    r = dgemma("edit", "-m", str(checkpoint), *ARGS, str(path), "--lines", "2-2", "-i")
    assert r.returncode == 0, r.stderr
    assert path.read_bytes() == expected.replace("\n", "\r\n").encode()
    assert path.read_bytes().startswith(b"def f(x):\r\n") and path.read_bytes().endswith(b"print(f(2))\r\n")


def test_edit_lines_outside_the_file_is_a_one_line_error_and_the_file_is_untouched(checkpoint, tmp_path):
    path = tmp_path / "f.py"
    path.write_text("a\nb\n")
    one_line_error(dgemma("edit", "-m", str(checkpoint), str(path), "--lines", "2-3", "-i"), "outside", "2 lines")
    one_line_error(dgemma("edit", "-m", str(checkpoint), str(path), "--lines", "two"), "A-B")
    assert path.read_text() == "a\nb\n"


def test_interrupted_in_place_edit_leaves_the_file_as_it_was(checkpoint, tmp_path):
    path = tmp_path / "f.py"
    text = "a\n" + "x = 1\n" * 40
    path.write_text(text)
    events = tmp_path / "events.jsonl"
    child = pexpect.spawn(sys.executable, ["-m", "dgemma_mlx", "edit", "-m", str(checkpoint), "--steps", "48",
                                           "--events", str(events), str(path), "--lines", "2-40", "-i"],
                          env={**os.environ, "COLUMNS": "100"}, dimensions=(30, 100), encoding="utf-8", timeout=120,
                          preexec_fn=restore_sigint)
    child.expect("step")  # the live view is up: the edit is running
    child.kill(2)
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert path.read_text() == text and sorted(os.listdir(tmp_path)) == ["events.jsonl", "f.py"]


def test_terminal_infill_shows_the_passes_then_the_filled_text(checkpoint, model, tokenizer):
    expected = infill(model, tokenizer, "the sky <|fill:3|> is blue", **FAST).text
    child = pexpect.spawn(sys.executable, ["-m", "dgemma_mlx", "infill", "-m", str(checkpoint), *ARGS,
                                           "the sky <|fill:3|> is blue"],
                          env={**os.environ, "COLUMNS": "100"}, dimensions=(30, 100), encoding="utf-8", timeout=120)
    child.expect(pexpect.EOF)
    child.close()
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", child.before)
    assert child.exitstatus == 0, out
    assert re.search(r"block 1 · step \d/3", out)
    assert expected in out[out.rindex("step"):]


def test_a_cold_edit_starts_the_hole_from_noise(model, tokenizer):
    text = "first line\nthe sky is blue\nlast line\n"
    current = words(tokenizer, "the sky is blue")
    spy = DenoiseSpy(model)
    cold = edit(spy, tokenizer, text, (2, 2), warm=False, **FAST)
    assert spy.canvases[0][: len(current)] != current
    assert cold.text.endswith("\nlast line\n") and cold.stats.steps >= 1


def test_a_text_may_start_with_a_hole(model, tokenizer):
    end = infill(model, tokenizer, "<|fill:3|> is blue", **FAST)
    assert end.text == end.fills[0] + " is blue"
    assert plan_infill(model, tokenizer, ["", " is blue"], [3]).prompt == [tokenizer.bos_token_id]
