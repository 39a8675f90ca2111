"""Images through generate, chat and the command line: runs, cache reuse, text-only runs unchanged,
and bad input reported in one line."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from PIL import Image

import tiny
from dgemma_mlx import DGemmaError, load
from dgemma_mlx.chat import ChatRepl, ChatSession
from dgemma_mlx.convert import convert
from dgemma_mlx.generate import build_prompt, generate
from dgemma_mlx.multimodal import build_image_prompt, read_images
from test_cli import FAST, dgemma, one_line_error

FAST_SETTINGS = dict(steps=3, seed=1, max_new_tokens=32)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pictures")
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(100, 150), (220, 90)]):
        paths.append(root / f"picture{i}.png")
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    (root / "notes.png").write_text("not an image")
    return paths


@pytest.fixture(scope="module")
def text_only_checkpoint(tmp_path_factory, checkpoint):
    return convert(checkpoint, tmp_path_factory.mktemp("text") / "mlx", dtype="float32", text_only=True)


def test_generate_with_two_images_runs_and_is_reproducible(model, tokenizer, pictures):
    images = read_images(model, pictures, 70)
    ids = build_image_prompt(model, tokenizer, "the sky is blue", images)
    a = generate(model, tokenizer, ids, images=images, **FAST_SETTINGS)
    b = generate(model, tokenizer, ids, images=images, **FAST_SETTINGS)
    assert a.tokens == b.tokens and len(a.tokens) == 32
    assert a.stats.prompt_tokens == len(ids) > sum(im.num_tokens for im in images)


def test_images_change_the_answer(model, tokenizer, pictures):
    images = read_images(model, pictures[:1], 70)
    with_image = generate(model, tokenizer, build_image_prompt(model, tokenizer, "the sky", images), images=images, **FAST_SETTINGS)
    other = read_images(model, pictures[1:], 70)
    with_other = generate(model, tokenizer, build_image_prompt(model, tokenizer, "the sky", other), images=other, **FAST_SETTINGS)
    assert with_image.tokens != with_other.tokens


def test_text_only_runs_are_bit_identical_with_and_without_a_vision_tower(model, tokenizer, text_only_checkpoint):
    text_model, _ = load(text_only_checkpoint)
    assert getattr(text_model, "vision_tower", None) is None and model.vision_tower is not None
    ids = build_prompt(tokenizer, "Why is the sky blue?")
    runs = []
    for m, extra in [(model, {}), (model, {"images": []}), (text_model, {})]:
        from dgemma_mlx.generate import stream_generate

        runs.append([(getattr(e, "canvas", None), getattr(e, "tokens", None))
                     for e in stream_generate(m, tokenizer, ids, **FAST_SETTINGS, **extra)])
    assert runs[0] == runs[1] == runs[2]


def test_images_with_a_text_only_checkpoint_are_refused(text_only_checkpoint, pictures):
    text_model, _ = load(text_only_checkpoint)
    with pytest.raises(DGemmaError, match="text-only"):
        read_images(text_model, pictures, 70)


def test_unsupported_budget_is_refused(model, pictures):
    with pytest.raises(DGemmaError, match="70, 140, 280, 560, 1120"):
        read_images(model, pictures, 100)


def test_too_many_image_tokens_for_the_context_are_refused(model, tokenizer, pictures):
    images = read_images(model, pictures * 2, 1120)  # about 4 x 1100 tokens; the context is 4096
    ids = build_image_prompt(model, tokenizer, "the sky", images)
    with pytest.raises(DGemmaError, match="too many image tokens"):
        generate(model, tokenizer, ids, images=images, **FAST_SETTINGS)


def fresh_logits(model, ids, images, canvas):
    from dgemma_mlx.multimodal import features_of

    cache = model.make_cache()
    model.encode(mx.array(ids)[None], cache, image_features=features_of(images))
    return np.array(model.denoise(mx.array(canvas)[None], cache))


def session_logits(session, canvas):
    return np.array(session.model.denoise(mx.array(canvas)[None], session.cache))


def test_chat_turns_after_an_image_reuse_the_cache_and_match_a_fresh_encode(model, tokenizer, pictures):
    session = ChatSession(model, tokenizer, settings=None)
    session.set_params(**FAST_SETTINGS)
    images = read_images(model, pictures[:1], 70)
    session.reply("the sky", images)
    session.reply("is blue")
    session.prefill()
    canvas = np.random.default_rng(0).integers(0, model.args.vocab_size, model.args.canvas_length).tolist()
    ids = session.render(add_generation_prompt=False)
    last_image_token = len(ids) - 1 - ids[::-1].index(tiny.IMAGE_ID)
    assert session.stats.per_turn[1].reused > last_image_token  # the image was encoded once
    assert session.ids == ids and ids.count(tiny.IMAGE_ID) == images[0].num_tokens
    assert np.abs(session_logits(session, canvas) - fresh_logits(model, ids, images, canvas)).max() <= 1e-4


def test_a_rewind_into_an_image_re_encodes_the_whole_image(model, tokenizer, pictures):
    session = ChatSession(model, tokenizer)
    session.set_params(**FAST_SETTINGS)
    images = read_images(model, pictures, 70)
    session.reply("the sky", images)
    session.set_system("a")  # the system turn comes first: everything after it is re-encoded
    session.prefill()
    canvas = np.random.default_rng(1).integers(0, model.args.vocab_size, model.args.canvas_length).tolist()
    ids = session.render(add_generation_prompt=False)
    assert np.abs(session_logits(session, canvas) - fresh_logits(model, ids, images, canvas)).max() <= 1e-4


def test_transcripts_keep_the_images_and_load_them_back(tmp_path, model, tokenizer, pictures):
    session = ChatSession(model, tokenizer)
    session.set_params(**FAST_SETTINGS)
    session.reply("the sky", read_images(model, pictures[:1], 70))
    saved = json.loads(session.save(tmp_path / "t.json").read_text())
    assert saved["messages"][0]["images"] == [{"path": str(pictures[0]), "image_tokens": 70}]
    again = ChatSession(model, tokenizer)
    again.load(tmp_path / "t.json")
    assert again.render() == session.render()
    assert again.messages[0]["images"][0].key == session.messages[0]["images"][0].key


def test_a_transcript_whose_image_is_gone_is_refused_and_changes_nothing(tmp_path, model, tokenizer):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"format": "dgemma-chat", "version": 1, "messages": [
        {"role": "user", "content": "hi", "images": [{"path": str(tmp_path / "gone.png"), "image_tokens": 70}]}]}))
    session = ChatSession(model, tokenizer)
    with pytest.raises(DGemmaError, match="gone.png"):
        session.load(path)
    assert session.messages == []


def test_repl_image_command_attaches_to_the_next_message(model, tokenizer, pictures):
    from io import StringIO

    from rich.console import Console

    out = StringIO()
    session = ChatSession(model, tokenizer)
    session.set_params(**FAST_SETTINGS)
    lines = iter([f"/image {pictures[0]}", "/image nowhere.png", "the sky"])

    def read(_prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError

    ChatRepl(session, Console(file=out, width=100), input_fn=read, history_file=None, image_tokens=70).run()
    text = out.getvalue()
    assert "attached" in text and "error: image 'nowhere.png' does not exist" in text
    assert len(session.messages[0]["images"]) == 1


def test_cli_generate_with_images_matches_the_library(checkpoint, model, tokenizer, pictures):
    r = dgemma("generate", "--model", str(checkpoint), *FAST, "-n", "16", "--events", "-",
               "--image", str(pictures[0]), "--image", str(pictures[1]), "--image-tokens", "70", "the sky")
    assert r.returncode == 0, r.stderr
    end = json.loads(r.stdout.splitlines()[-1])
    images = read_images(model, pictures, 70)
    ours = generate(model, tokenizer, build_image_prompt(model, tokenizer, "the sky", images), images=images,
                    steps=3, seed=1, max_new_tokens=16)
    assert end["tokens"] == ours.tokens


def test_cli_chat_takes_images_and_the_image_command(checkpoint, pictures):
    r = dgemma("chat", "--model", str(checkpoint), *FAST, "-n", "16", "--image", str(pictures[0]),
               "--image-tokens", "70", input=f"the sky\n/image {pictures[1]}\nis blue\n")
    assert r.returncode == 0, r.stderr
    assert "attached" in r.stdout


@pytest.mark.parametrize(
    "args, words",
    [
        (["--image", "NOTES"], ["not an image"]),
        (["--image", "missing.png"], ["does not exist"]),
        (["--image", "PIC", "--image-tokens", "100"], ["unsupported image token budget", "1120"]),
        (["--image", "PIC", "--image", "PIC", "--image", "PIC", "--image", "PIC", "--image-tokens", "1120"],
         ["too many image tokens"]),
    ],
)
def test_cli_bad_image_input_is_one_line(checkpoint, pictures, args, words):
    args = [str(pictures[0]) if a == "PIC" else str(pictures[0].parent / "notes.png") if a == "NOTES" else a for a in args]
    one_line_error(dgemma("generate", "--model", str(checkpoint), *FAST, *args, "the sky"), *words)


def test_cli_image_with_a_text_only_checkpoint_is_one_line(text_only_checkpoint, pictures):
    for command in (["generate", "the sky"], ["chat"]):
        r = dgemma(*command, "--model", str(text_only_checkpoint), *FAST, "--image", str(pictures[0]), input="")
        one_line_error(r, "text-only")


def test_cli_convert_text_only_drops_the_vision_tower(tmp_path, checkpoint):
    r = dgemma("convert", "--hf-path", str(checkpoint), "--mlx-path", str(tmp_path / "out"), "--text-only")
    assert r.returncode == 0, r.stderr
    assert "vision_config" not in json.loads((tmp_path / "out" / "config.json").read_text())


def test_a_different_image_in_place_of_a_cancelled_one_is_encoded_anew(model, tokenizer, pictures):
    """Image tokens are the same ids for every image: the cache must not mistake one for another."""
    session = ChatSession(model, tokenizer)
    session.set_params(**FAST_SETTINGS)
    first, second = read_images(model, [pictures[0], pictures[0]], 70)  # same size, other features
    second = type(second)(second.features * 0.5, "other")
    events = session.send("the sky", [first])
    next(events)  # the prompt with the first image is in the cache now
    events.close()  # cancelled before any answer: the message is dropped
    assert session.messages == []
    session.reply("the sky", [second])
    session.prefill()
    canvas = np.random.default_rng(2).integers(0, model.args.vocab_size, model.args.canvas_length).tolist()
    ids = session.render(add_generation_prompt=False)
    assert np.abs(session_logits(session, canvas) - fresh_logits(model, ids, [second], canvas)).max() <= 1e-4
