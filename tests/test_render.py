"""The live refinement view, the plain view and the stats line."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from dgemma_mlx.channels import ChannelSplitter, Segment
from dgemma_mlx.events import CommitEvent, EndEvent, GenerationStats, PassEvent
from dgemma_mlx.render import (
    ACCEPTED_STYLE,
    LiveView,
    PlainView,
    TokenPieces,
    format_stats,
    make_view,
    noise_style,
)
from tiny import enc

ANSI = re.compile(r"\x1b[\[\]()?0-9;]*[A-Za-z]?")


def make_pass(canvas, *, block=0, step=1, accepted=None, entropy=None, mean_entropy=0.5, tps=0.0):
    n = len(canvas)
    accepted = accepted if accepted is not None else [False] * n
    entropy = entropy if entropy is not None else [1.0] * n
    return PassEvent(
        block=block, step=step, max_steps=48, temperature=0.6, canvas=list(canvas), accepted=accepted,
        entropy=entropy, mean_entropy=mean_entropy, stopped=False, elapsed=1.0, tokens_per_second=tps,
    )


def commits(tok):
    """``commit(tokens, block, finished)`` making the commit events of one generation, with the
    typed segments the generator's splitter gives them."""
    splitter = ChannelSplitter(tok)

    def commit(tokens, block=0, finished=False):
        segments = splitter.commit(tokens, final=finished)
        return CommitEvent(block=block, tokens=list(tokens), text="", steps=3, eos=False, finished=finished,
                           encoded=True, segments=segments)

    return commit


def recording_console(width=80, height=24) -> Console:
    return Console(record=True, width=width, height=height, force_terminal=True, color_system="truecolor",
                   file=io.StringIO())


def frame_text(view: LiveView, console: Console) -> str:
    """The live region as plain text (rendered once, not via the live thread)."""
    console.print(view)
    return console.export_text()


def styles_of(view: LiveView, console: Console, piece: str):
    """Styles of the rendered segments whose text is exactly ``piece``."""
    found = [seg.style for seg in console.render(view, console.options) if seg.text == piece]
    assert found, f"{piece!r} not rendered as its own segment"
    return found


# -- the canvas ------------------------------------------------------------------------------------


def test_canvas_shows_every_positions_token_text(tok):
    view = LiveView(tok, recording_console())
    view.update(make_pass(enc(tok, "The sky is blue\nnext")))
    assert "The sky is blue↵next" in frame_text(view, view.console)


def test_special_tokens_are_shown_compactly(tok):
    pieces = TokenPieces(tok)
    assert pieces.piece(100) == "⟨channel"
    assert pieces.piece(101) == "channel⟩"
    assert pieces.piece(0) == "⟨pad⟩"
    assert pieces.piece(98) == "⟨think⟩"


def test_byte_tokens_forming_a_character_are_shown_as_the_character(tok):
    view = LiveView(tok, recording_console())
    view.update(make_pass(enc(tok, "a 日本")))
    assert "a 日本" in frame_text(view, view.console)


def test_a_stray_byte_token_is_shown_as_its_hex_value(tok):
    lone = enc(tok, "日")[0]  # the lead byte 0xE6 alone
    view = LiveView(tok, recording_console())
    view.update(make_pass([lone] + enc(tok, "a")))
    assert "‹E6›a" in frame_text(view, view.console)


def test_accepted_positions_are_styled_as_accepted(tok):
    ids = enc(tok, "The sky is blue")  # T h e ▁sky ▁is ▁blue
    view = LiveView(tok, recording_console())
    view.update(make_pass(ids, accepted=[False, False, False, True, False, True]))
    assert all(s.bold and s.color == ACCEPTED_STYLE.color for s in styles_of(view, view.console, " sky"))
    assert all(s.bold and s.color == ACCEPTED_STYLE.color for s in styles_of(view, view.console, " blue"))
    assert not any(s.bold for s in styles_of(view, view.console, " is"))


def test_noisy_positions_are_coloured_by_their_entropy(tok):
    ids = enc(tok, "The sky is blue")
    view = LiveView(tok, recording_console())
    view.update(make_pass(ids, entropy=[0.0, 0.0, 0.0, 0.0, 6.0, 0.0]))
    (sure,) = styles_of(view, view.console, " sky")
    (unsure,) = styles_of(view, view.console, " is")
    assert sure.color == noise_style(0.0).color
    assert unsure.color == noise_style(6.0).color
    assert sure.color != unsure.color


def test_tokens_changed_since_the_previous_pass_are_marked(tok):
    first = enc(tok, "The sky is blue")
    second = list(first)
    second[4] = enc(tok, " a")[0]  # " is" -> " a"
    view = LiveView(tok, recording_console())
    view.update(make_pass(first, step=1))
    view.update(make_pass(second, step=2))
    assert all(s.underline for s in styles_of(view, view.console, " a"))
    assert not any(s.underline for s in styles_of(view, view.console, " sky"))


def test_first_pass_of_a_block_marks_nothing_changed(tok):
    commit = commits(tok)
    view = LiveView(tok, recording_console())
    view.update(make_pass(enc(tok, "The sky"), block=0))
    view.update(commit(enc(tok, "The sky")))
    view.update(make_pass(enc(tok, " is blue"), block=1))
    segments = list(view.console.render(view, view.console.options))
    assert not any(seg.style and seg.style.underline for seg in segments)


# -- the status line -------------------------------------------------------------------------------


def test_status_line_shows_block_step_accepted_entropy_and_speed(tok):
    ids = enc(tok, "The sky is blue")
    view = LiveView(tok, recording_console(width=120))
    view.update(make_pass(ids, block=1, step=5, accepted=[True, True, True, False, False, False],
                          mean_entropy=0.4321, tps=23.45))
    text = frame_text(view, view.console)
    status = text.strip().splitlines()[-1]
    assert "block 2" in status  # shown 1-based
    assert "step 5/48" in status
    assert "accepted 3/6" in status
    assert "entropy 0.432" in status
    assert "23.4 tok/s" in status or "23.5 tok/s" in status


def test_status_line_before_the_first_pass_says_prefilling(tok):
    view = LiveView(tok, recording_console())
    assert "prefilling" in frame_text(view, view.console)


# -- the committed text and the height budget ------------------------------------------------------


def test_committed_thought_is_shown_dim_under_a_thinking_label(tok):
    commit = commits(tok)
    view = LiveView(tok, recording_console())
    view.update(commit(enc(tok, "<|channel>thought\nhmm<channel|>The sky")))
    text = frame_text(view, view.console)
    assert text.index("thinking") < text.index("hmm") < text.index("The sky")
    assert all(s.dim for s in styles_of(view, view.console, "hmm"))
    assert not any(s and s.dim for s in styles_of(view, view.console, "The sky"))


def test_region_fits_the_console_height_with_a_long_committed_text(tok):
    commit = commits(tok)
    console = recording_console(width=40, height=12)
    view = LiveView(tok, console)
    lines = [f"line {i} the sky is blue" for i in range(60)]
    view.update(commit(enc(tok, "\n".join(lines))))
    view.update(make_pass(enc(tok, "The sky is blue " * 3), block=1, step=2))
    text = frame_text(view, console)
    rendered = text.rstrip("\n").split("\n")
    assert len(rendered) <= console.height - 1
    assert "line 59 the sky is blue" in text  # the tail of the committed text is kept
    assert "line 0 " not in text
    assert "step 2/48" in rendered[-1]


def test_a_canvas_taller_than_the_console_is_cropped_with_an_ellipsis(tok):
    console = recording_console(width=30, height=6)
    view = LiveView(tok, console)
    view.update(make_pass(enc(tok, "The sky is blue. " * 20)))
    rendered = frame_text(view, console).rstrip("\n").split("\n")
    assert len(rendered) <= console.height - 1
    assert any(line.endswith("…") for line in rendered)
    assert "step 1/48" in rendered[-1]


# -- the live region and the final text -----------------------------------------------------------


def final_output(console: Console) -> str:
    """What was written after the live region was erased (erase-line is the last live control)."""
    return console.file.getvalue().rsplit("\x1b[2K", 1)[-1]


def test_after_end_event_the_final_answer_is_printed_as_plain_text(tok):
    commit = commits(tok)
    console = recording_console(width=40)
    answer = "The sky is blue. " * 6 + "日本"
    ids = enc(tok, answer)
    with LiveView(tok, console, refresh_per_second=20) as view:
        view.update(make_pass(ids))
        view.update(commit(ids[:20]))
        view.update(commit(ids[20:], block=1, finished=True))
        view.update(EndEvent(text=answer, tokens=ids, finish_reason="eos"))
        written = console.file.getvalue()
        console.print("after")  # nothing of the view is drawn after the end event
    final = final_output(console)
    assert answer.strip() in final  # one unbroken, unstyled run of text
    assert final.count("The sky is blue.") == 6
    assert console.file.getvalue() == written + "after\n"


def test_final_output_shows_the_thought_dimmed_apart_from_the_answer(tok):
    commit = commits(tok)
    console = recording_console()
    ids = enc(tok, "<|channel>thought\nhmm the sky<channel|>The sky is blue.")
    with LiveView(tok, console) as view:
        view.update(commit(ids, finished=True))
        view.update(EndEvent(text="", tokens=ids, finish_reason="eos"))
    final = final_output(console)
    assert "\x1b[2;3mhmm the sky\x1b[0m" in final  # dim italic
    assert final.index("thinking") < final.index("hmm the sky") < final.index("The sky is blue.")
    assert "\nThe sky is blue.\n" in final


def test_leaving_early_prints_the_committed_answer_once(tok):
    commit = commits(tok)
    console = recording_console()
    with pytest.raises(KeyboardInterrupt):
        with LiveView(tok, console) as view:
            view.update(commit(enc(tok, "The sky is")))
            view.update(make_pass(enc(tok, " blue"), block=1))
            raise KeyboardInterrupt
    final = final_output(console)
    assert "The sky is" in final
    assert final.count("The sky is") == 1
    assert "blue" not in final


def test_update_only_swaps_state_and_never_draws(tok, monkeypatch):
    console = recording_console()
    renders = []
    original = LiveView.__rich_console__

    def counting(self, console, options):
        renders.append(1)
        yield from original(self, console, options)

    monkeypatch.setattr(LiveView, "__rich_console__", counting)
    ids = enc(tok, "The sky is blue")
    with LiveView(tok, console, refresh_per_second=4) as view:
        for step in range(1, 501):
            view.update(make_pass(ids, step=step))
    assert len(renders) < 10  # 500 passes were coalesced: update itself never draws


# -- plain mode, view choice and stats -------------------------------------------------------------


def test_plain_view_writes_only_the_answer_without_escape_codes(tok):
    commit = commits(tok)
    out = io.StringIO()
    ids = enc(tok, "<|channel>thought\nhmm<channel|>The sky ✓ is blue.")
    with PlainView(tok, out) as view:
        view.update(make_pass(ids))
        view.update(commit(ids[:12]))
        view.update(commit(ids[12:], block=1, finished=True))
        view.update(EndEvent(text="", tokens=ids, finish_reason="eos"))
    assert out.getvalue() == "The sky ✓ is blue.\n"
    assert not ANSI.search(out.getvalue())


def test_make_view_is_plain_when_the_console_is_not_a_terminal(tok):
    not_a_terminal = Console(file=io.StringIO(), force_terminal=False)
    assert isinstance(make_view(tok, not_a_terminal), PlainView)
    assert isinstance(make_view(tok, recording_console()), LiveView)


def test_format_stats_is_two_lines_with_the_measurements():
    stats = GenerationStats(prompt_tokens=12, prompt_seconds=0.05, prefill_tps=240.0, generated_tokens=300,
                            blocks=2, steps=40, tokens_per_forward=7.5, generation_seconds=6.0,
                            generation_tps=50.0, peak_memory_gb=3.21)
    text = format_stats(stats)
    assert len(text.splitlines()) == 2
    for value in ["12 tokens", "240.0 tok/s", "300 tokens", "2 blocks", "40 passes", "7.50 tok/pass",
                  "50.0 tok/s", "3.21 GB"]:
        assert value in text


def test_pinned_positions_have_their_own_style(tok):
    from dataclasses import replace

    from dgemma_mlx.render import PINNED_STYLE

    ids = enc(tok, "The sky is blue")  # T h e ▁sky ▁is ▁blue
    event = replace(make_pass(ids, accepted=[True] * 6), pinned=[False, False, False, True, False, True])
    view = LiveView(tok, recording_console())
    view.update(event)
    assert all(s.color == PINNED_STYLE.color and not s.bold for s in styles_of(view, view.console, " sky"))
    assert all(s.bold and s.color == ACCEPTED_STYLE.color for s in styles_of(view, view.console, " is"))


def test_control_characters_in_model_text_reach_the_terminal_as_symbols(tok):
    # A model's text could otherwise clear the screen or move the cursor (ESC [ 2 J, ...).
    console = recording_console()
    answer = "a\x1b[2Jb\x07c\x7fd\x9be\tf"
    with LiveView(tok, console) as view:
        view.update(CommitEvent(block=0, tokens=[5], text=answer, steps=1, eos=False, finished=True,
                                encoded=True, segments=(Segment("answer", answer),)))
        assert "a␛[2Jb␇c␡d\ufffde" in frame_text(view, console)  # the live region
        view.update(EndEvent(text=answer, tokens=[5], finish_reason="eos"))
    assert "a␛[2Jb␇c␡d\ufffde" in final_output(console)
    written = console.file.getvalue()
    assert not any(c in written for c in ("\x1b[2J", "\x07", "\x7f", "\x9b"))


def test_piped_output_keeps_the_model_text_exactly(tok):
    out = io.StringIO()
    answer = "a\x1b[2Jb\tc"
    with PlainView(tok, out) as view:
        view.update(CommitEvent(block=0, tokens=[5], text=answer, steps=1, eos=False, finished=True,
                                encoded=True, segments=(Segment("answer", answer),)))
        view.update(EndEvent(text=answer, tokens=[5], finish_reason="eos"))
    assert out.getvalue() == answer + "\n"
