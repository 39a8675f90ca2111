"""`dgemma serve` with images: OpenAI ``image_url`` parts (data URLs and local paths) answer as a
direct generation with the same images, repeated images are served from the prefix cache, and bad
image requests get OpenAI errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import openai
import pytest
from PIL import Image

from dgemma_mlx import load
from dgemma_mlx.convert import convert
from dgemma_mlx.generate import generate
from dgemma_mlx.multimodal import build_image_prompt, read_images
from serving import ServerThread, post

SETTINGS = {"steps": 3, "image_tokens": 70}
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("pictures") / "sky.png"
    pixels = np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    s = ServerThread(model, tokenizer, model_id="dgemma")
    yield s
    s.close()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def ask(client, url: str, text: str = "the sky", seed: int = 3, history=()):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]
    return client.chat.completions.create(
        model="dgemma", messages=[*history, {"role": "user", "content": content}], seed=seed,
        max_tokens=MAX_TOKENS, extra_body=SETTINGS,
    )


def test_an_image_part_answers_as_the_direct_generation(client, model, tokenizer, picture):
    reply = ask(client, data_url(picture))
    images = read_images(model, [picture], 70)
    direct = generate(model, tokenizer, build_image_prompt(model, tokenizer, "the sky", images), images=images,
                      seed=3, steps=3, max_new_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == direct.text
    assert reply.usage.prompt_tokens == len(build_image_prompt(model, tokenizer, "the sky", images))


def test_local_paths_and_file_urls_read_the_same_image(client, picture):
    answers = {ask(client, url).choices[0].message.content for url in (data_url(picture), str(picture), f"file://{picture}")}
    assert len(answers) == 1


def test_the_next_turn_reuses_the_cached_image(client, picture):
    first = ask(client, data_url(picture), "the sky")
    history = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture)}},
                                     {"type": "text", "text": "the sky"}]},
        {"role": "assistant", "content": first.choices[0].message.content},
    ]
    second = client.chat.completions.create(
        model="dgemma", messages=[*history, {"role": "user", "content": "is blue"}], seed=3,
        max_tokens=MAX_TOKENS, extra_body=SETTINGS,
    )
    assert second.usage.prompt_tokens_details.cached_tokens > 70  # past the image's 60 tokens


def test_another_image_of_the_same_size_is_not_taken_from_the_cache(client, picture, tmp_path):
    other = tmp_path / "other.png"
    pixels = np.random.default_rng(9).integers(0, 256, (100, 150, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(other)
    ask(client, data_url(picture))
    reply = ask(client, data_url(other))
    assert reply.usage.prompt_tokens_details.cached_tokens < 10  # re-encoded from the image on


@pytest.mark.parametrize(
    "part, words",
    [
        ({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}, "not fetched"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}, "base64"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"text").decode()}},
         "not an image"),
        ({"type": "image_url", "image_url": {"url": "/nowhere/at/all.png"}}, "does not exist"),
        ({"type": "image_url"}, "url"),
    ],
)
def test_bad_image_parts_are_400s(server, part, words):
    body = {"model": "dgemma", "messages": [{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]}
    r = post(server.base_url + "/chat/completions", body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith("messages[0].content") and words in error["message"]


def test_an_unsupported_budget_is_a_400(server, picture):
    body = {"model": "dgemma", "image_tokens": 100,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(picture)}}]}]}
    r = post(server.base_url + "/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "image_tokens"


def test_too_many_image_tokens_are_a_context_length_error(server, picture):
    parts = [{"type": "image_url", "image_url": {"url": str(picture)}}] * 4
    body = {"model": "dgemma", "image_tokens": 1120, "messages": [{"role": "user", "content": parts}]}
    r = post(server.base_url + "/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert "too many image tokens" in r.json()["error"]["message"]


def test_images_in_assistant_messages_are_refused(server, picture):
    body = {"model": "dgemma", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": str(picture)}}]},
        {"role": "user", "content": "hi"},
    ]}
    r = post(server.base_url + "/chat/completions", body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].content"


def test_a_text_only_model_refuses_images(tmp_path, checkpoint, picture):
    model, tokenizer = load(convert(checkpoint, tmp_path / "text", text_only=True))
    s = ServerThread(model, tokenizer, model_id="dgemma")
    try:
        body = {"model": "dgemma", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(picture)}}]}]}
        r = post(s.base_url + "/chat/completions", body)
        assert r.status_code == 400 and "text-only" in r.json()["error"]["message"]
    finally:
        s.close()
