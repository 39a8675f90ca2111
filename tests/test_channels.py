"""ChannelSplitter: committed tokens → thought text and answer text."""

from __future__ import annotations


from dgemma_mlx.channels import ChannelSplitter, Segment
from tiny import enc

CHANNEL, END_CHANNEL, TURN = 100, 101, 105
THOUGHT_TOKEN = 467  # the single vocab token "thought"


def run(tok, *feeds: list[int]) -> tuple[ChannelSplitter, list[Segment]]:
    splitter = ChannelSplitter(tok)
    segments: list[Segment] = []
    for ids in feeds:
        segments += splitter.feed(ids)
    segments += splitter.flush()
    return splitter, segments


def joined(segments: list[Segment], kind: str) -> str:
    return "".join(s.text for s in segments if s.kind == kind)


THINKING = "<|channel>thought\nThe sky is blue. é 日本<channel|>The answer ✓ is blue."


def test_thought_and_answer_are_split_within_one_feed(tok):
    splitter, segments = run(tok, enc(tok, THINKING))
    assert splitter.thought == "The sky is blue. é 日本"
    assert splitter.answer == "The answer ✓ is blue."
    assert segments == [
        Segment("thought", "The sky is blue. é 日本"),
        Segment("answer", "The answer ✓ is blue."),
    ]


def test_channel_name_written_as_one_token_is_not_thought_text(tok):
    ids = [CHANNEL, THOUGHT_TOKEN] + enc(tok, "\nhmm") + [END_CHANNEL] + enc(tok, "ok")
    splitter, _ = run(tok, ids)
    assert (splitter.thought, splitter.answer) == ("hmm", "ok")


def test_every_single_cut_point_gives_the_same_split(tok):
    ids = enc(tok, THINKING)
    for cut in range(len(ids) + 1):
        splitter, segments = run(tok, ids[:cut], ids[cut:])
        assert splitter.thought == "The sky is blue. é 日本", cut
        assert splitter.answer == "The answer ✓ is blue.", cut
        assert joined(segments, "thought") == splitter.thought
        assert joined(segments, "answer") == splitter.answer


def test_feeding_one_token_at_a_time_gives_the_same_split(tok):
    ids = enc(tok, THINKING)
    splitter, segments = run(tok, *[[i] for i in ids])
    assert (splitter.thought, splitter.answer) == ("The sky is blue. é 日本", "The answer ✓ is blue.")
    assert all("\ufffd" not in s.text for s in segments)


def test_feed_ending_after_channel_name_emits_no_thought_until_the_name_line_ends(tok):
    splitter = ChannelSplitter(tok)
    assert splitter.feed([CHANNEL, THOUGHT_TOKEN]) == []
    assert splitter.feed(enc(tok, "\nthe sky")) == [Segment("thought", "the sky")]


def test_feed_ending_with_channel_start_marker(tok):
    splitter = ChannelSplitter(tok)
    assert splitter.feed(enc(tok, "a") + [CHANNEL]) == [Segment("answer", "a")]
    assert splitter.feed(enc(tok, "thought\nhmm")) == [Segment("thought", "hmm")]


def test_empty_thought_channel_leaves_all_text_to_the_answer(tok):
    splitter, segments = run(tok, enc(tok, "<|channel>thought\n<channel|>The sky is blue."))
    assert splitter.thought == ""
    assert splitter.answer == "The sky is blue."
    assert [s.kind for s in segments] == ["answer"]


def test_channel_closed_before_its_name_line_ends_has_no_thought(tok):
    splitter, _ = run(tok, [CHANNEL, THOUGHT_TOKEN, END_CHANNEL] + enc(tok, "blue"))
    assert (splitter.thought, splitter.answer) == ("", "blue")


def test_output_without_channel_is_all_answer(tok):
    splitter, segments = run(tok, enc(tok, "The sky"), enc(tok, " is blue."))
    assert splitter.thought == ""
    assert splitter.answer == "The sky is blue."
    assert segments == [Segment("answer", "The sky"), Segment("answer", " is blue.")]


def test_special_tokens_are_never_text(tok):
    splitter, _ = run(tok, enc(tok, "a") + [TURN, 2, 0] + enc(tok, "b"))
    assert splitter.answer == "ab"


def test_utf8_character_split_across_feeds_comes_out_whole(tok):
    ids = enc(tok, "x 日本 ✓")
    byte_positions = [i for i, t in enumerate(ids) if tok.convert_ids_to_tokens(t).startswith("<0x")]
    cut = byte_positions[1]  # inside the three bytes of 日
    splitter = ChannelSplitter(tok)
    first = splitter.feed(ids[:cut])
    assert first == [Segment("answer", "x ")]
    second = splitter.feed(ids[cut:])
    assert second == [Segment("answer", "日本 ✓")]
    assert splitter.answer == "x 日本 ✓"


def test_flush_releases_a_character_that_never_completed(tok):
    ids = enc(tok, "a ✓")[:-1]  # drop the last byte of ✓
    splitter = ChannelSplitter(tok)
    assert splitter.feed(ids) == [Segment("answer", "a ")]
    flushed = splitter.flush()
    assert flushed and flushed[0].text.startswith("\ufffd")
