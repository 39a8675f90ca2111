"""`dgemma serve`: the OpenAI-compatible server, driven by the official `openai` client and raw HTTP.

Most tests talk to one `dgemma serve` subprocess on a loopback port (the tiny float32 checkpoint of
``conftest.py``) and compare its answers with a direct :func:`generate` in this process on the same
checkpoint. Tests that must control timing (queue full, disconnects) or options (API key, cache
bound) run the app on a thread of this process, some with a model whose passes the test lets
through one at a time.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from dgemma_mlx.chat import ChatSession
from dgemma_mlx.cli import main
from dgemma_mlx.events import CommitEvent
from dgemma_mlx.generate import build_prompt, default_settings, generate, render_chat, stream_generate
from dgemma_mlx.infill import infill
from dgemma_mlx.serve import bind
from serving import GatedModel, ServerProcess, ServerThread, post, sse_chunks, wait_until

FAST = {"steps": 3}  # extra body: few passes per block (replies are gibberish on a random model)
MAX_TOKENS = 32  # two 16-token blocks unless EOS comes first
QUESTIONS = ["the sky is blue", "is the sky blue?", "a blue sky", "the sky is a sky", "blue"]


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    proc = ServerProcess(checkpoint, tmp_path_factory.mktemp("serve") / "server.log", "--max-queue", "64")
    yield proc
    proc.close()
    log = proc.log.read_text().splitlines()[1:]  # after the "Serving ..." line
    assert not log, "the server logged:\n" + "\n".join(log)


@pytest.fixture(scope="module")
def model_id(checkpoint) -> str:
    return str(checkpoint)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=60)


def direct_chat(model, tokenizer, question: str, seed: int, **kw):
    ids = build_prompt(tokenizer, question)
    return generate(model, tokenizer, ids, seed=seed, steps=kw.get("steps", 3),
                    max_new_tokens=kw.get("max_tokens", MAX_TOKENS))


def chat(client, model_id, question: str, seed: int, **kw):
    """A one-question chat request; OpenAI fields in ``kw`` go as such, the rest as extra body."""
    standard = {k: kw.pop(k) for k in ("stream", "stream_options", "stop", "max_tokens") if k in kw}
    return client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": question}], seed=seed,
        **{"max_tokens": MAX_TOKENS, **standard}, extra_body={**FAST, **kw},
    )


# ------------------------------------------------------------------------------------ endpoints


def test_models_lists_the_served_model(client, model_id):
    assert [m.id for m in client.models.list().data] == [model_id]


def test_health_reports_the_worker(server, model_id):
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == model_id and health["max_queue"] == 64


def test_chat_completion_is_the_direct_generation(client, model_id, model, tokenizer):
    reply = chat(client, model_id, QUESTIONS[0], seed=7)
    direct = direct_chat(model, tokenizer, QUESTIONS[0], seed=7)
    assert reply.choices[0].message.content == direct.text
    assert reply.choices[0].finish_reason == {"eos": "stop", "length": "length"}[direct.finish_reason]
    usage = reply.usage
    assert usage.prompt_tokens == len(build_prompt(tokenizer, QUESTIONS[0]))
    assert usage.completion_tokens == len(direct.tokens)
    assert usage.passes == direct.stats.steps and usage.blocks == direct.stats.blocks
    assert usage.tokens_per_pass == pytest.approx(len(direct.tokens) / direct.stats.steps, abs=1e-4)


def test_completion_is_the_direct_generation_of_the_raw_prompt(client, model_id, model, tokenizer):
    reply = client.completions.create(model=model_id, prompt="the sky is", seed=3, max_tokens=24, extra_body=FAST)
    commits = [e for e in stream_generate(model, tokenizer, "the sky is", seed=3, steps=3, max_new_tokens=24)
               if isinstance(e, CommitEvent)]
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "".join(e.text for e in commits)  # thought markers and all: raw text
    assert reply.usage.completion_tokens == sum(len(e.tokens) for e in commits)
    assert reply.usage.prompt_tokens == len(tokenizer.encode("the sky is"))


def test_same_seed_gives_the_same_text_streamed_or_not(client, model_id):
    whole = chat(client, model_id, QUESTIONS[1], seed=5)
    stream = chat(client, model_id, QUESTIONS[1], seed=5, stream=True)
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices for c in chunks)  # no drafts unless asked for
    other = chat(client, model_id, QUESTIONS[1], seed=6)
    assert other.choices[0].message.content != whole.choices[0].message.content


def test_stream_with_drafts_sends_one_draft_per_pass_before_its_commit(server, model_id):
    body = {"model": model_id, "messages": [{"role": "user", "content": QUESTIONS[2]}], "seed": 1,
            "max_tokens": MAX_TOKENS, "stream": True, **FAST,
            "stream_options": {"include_drafts": True, "include_usage": True}}
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        chunks = list(sse_chunks(r))
    drafts = [c["draft"] for c in chunks if "draft" in c]
    usage = chunks[-1]["usage"]
    assert len(drafts) == usage["passes"] > 0
    assert [d["step"] for d in drafts if d["block"] == 0] == list(range(1, 1 + sum(d["block"] == 0 for d in drafts)))
    for d in drafts:
        assert set(d) >= {"text", "accepted", "mean_entropy", "block", "step", "max_steps", "canvas_length"}
        assert 1 <= d["accepted"] <= d["canvas_length"] == 16 and d["max_steps"] == 3
    # The first content delta comes after block 0's last draft, whose text it is.
    kinds = ["draft" if "draft" in c else "content" if c["choices"] and c["choices"][0]["delta"].get("content")
             else "other" for c in chunks]
    first_content = kinds.index("content")
    assert kinds[first_content - 1] == "draft" and chunks[first_content - 1]["draft"]["block"] == 0
    assert chunks[first_content]["choices"][0]["delta"]["content"].startswith(
        chunks[first_content - 1]["draft"]["text"].rstrip("\ufffd")[:4])


def test_drafts_reach_the_openai_client_as_chunks_without_choices(client, model_id):
    chunks = list(chat(client, model_id, QUESTIONS[3], seed=2, stream=True,
                       stream_options={"include_drafts": True}))
    drafts = [c.draft for c in chunks if not c.choices]
    assert drafts and all("text" in d for d in drafts)
    whole = chat(client, model_id, QUESTIONS[3], seed=2)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content


def test_completion_streams_text_chunks(client, model_id):
    whole = client.completions.create(model=model_id, prompt="blue sky", seed=9, max_tokens=MAX_TOKENS, extra_body=FAST)
    chunks = list(client.completions.create(model=model_id, prompt="blue sky", seed=9, max_tokens=MAX_TOKENS,
                                            extra_body=FAST, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_completion_with_suffix_is_the_infill_of_the_hole(client, model_id, model, tokenizer):
    prompt, suffix = "def area(r):\n    return ", "\n\nprint(area(2))"
    reply = client.completions.create(model=model_id, prompt=prompt, suffix=suffix, seed=2, max_tokens=8,
                                      extra_body=FAST)
    direct = infill(model, tokenizer, prompt + "<|fill|>" + suffix, fill_length=8, seed=2, steps=3)
    assert reply.choices[0].text == direct.fills[0]
    assert reply.usage.prompt_tokens == len(tokenizer.encode(prompt)) and reply.usage.completion_tokens <= 8
    assert reply.usage.passes == direct.stats.steps
    chunks = list(client.completions.create(model=model_id, prompt=prompt, suffix=suffix, seed=2, max_tokens=8,
                                            extra_body=FAST, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == direct.fills[0]


def test_a_suffix_with_a_fill_marker_is_a_400(server, model_id):
    r = post(server.base_url + "/completions", {"model": model_id, "prompt": "a", "suffix": "b <|fill|> c"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


def test_stop_string_ends_the_answer_before_it(client, model_id, model, tokenizer):
    text = direct_chat(model, tokenizer, QUESTIONS[4], seed=4).text
    stop = text[5:8]
    assert len(text) > 10 and stop
    reply = chat(client, model_id, QUESTIONS[4], seed=4, stop=[stop])
    assert reply.choices[0].message.content == text[: text.index(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_a_later_turn_reuses_the_cached_conversation(client, model_id, model, tokenizer):
    settings = default_settings(model).update(steps=3, max_new_tokens=MAX_TOKENS, seed=8)
    session = ChatSession(model, tokenizer, settings=settings)
    first = session.reply(QUESTIONS[0])
    second = session.reply(QUESTIONS[1])
    messages = [{"role": "user", "content": QUESTIONS[0]}]
    r1 = client.chat.completions.create(model=model_id, messages=messages, seed=8, max_tokens=MAX_TOKENS, extra_body=FAST)
    assert r1.choices[0].message.content == first.text
    messages += [{"role": "assistant", "content": r1.choices[0].message.content.strip()},
                 {"role": "user", "content": QUESTIONS[1]}]
    r2 = client.chat.completions.create(model=model_id, messages=messages, seed=8, max_tokens=MAX_TOKENS, extra_body=FAST)
    assert r2.choices[0].message.content == second.text
    shared = render_chat(tokenizer, messages[:1], think=False, add_generation_prompt=False)
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(shared)


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "body, status, param, code",
    [
        ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}, 404, "model", "model_not_found"),
        ({"messages": [{"role": "user", "content": "hi"}], "model": None}, 400, "model", None),
        ({"messages": []}, 400, "messages", None),
        ({"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0].role", None),
        ({"messages": [{"role": "user", "content": "hi"}], "steps": 0}, 400, "steps", None),
        ({"messages": [{"role": "user", "content": "hi"}], "steps": "many"}, 400, "steps", None),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens", None),
        ({"messages": [{"role": "user", "content": "hi"}], "t_min": 0.9, "t_max": 0.5}, 400, "t_min", None),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", None),
        ({"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, 400,
         "stream_options", None),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
         "messages[0].content", None),
    ],
)
def test_bad_chat_requests_get_openai_errors(server, model_id, body, status, param, code):
    body = {k: v for k, v in {"model": model_id, **body}.items() if v is not None}
    r = post(server.base_url + "/chat/completions", body)
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    assert error["type"] == "invalid_request_error"


def test_bad_json_is_a_400(server):
    r = httpx.post(server.base_url + "/chat/completions", content=b"{not json", timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


def test_a_prompt_longer_than_the_context_is_a_400(client, model_id, model):
    context = model.args.max_position_embeddings
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=model_id, prompt=[200] * (context - 8), max_tokens=16)
    assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"


def test_the_openai_client_sees_an_unknown_model_as_not_found(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


def test_unknown_routes_answer_in_the_error_shape(server):
    r = httpx.get(server.base_url + "/engines")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(server.base_url + "/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_a_wrong_api_key_is_a_401(model, tokenizer):
    srv = ServerThread(model, tokenizer, model_id="m", api_key="sesame")
    try:
        bad = openai.OpenAI(base_url=srv.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.code == "invalid_api_key"
        r = httpx.post(srv.base_url + "/chat/completions", json={"model": "m", "messages": []})
        assert r.status_code == 401
        good = openai.OpenAI(base_url=srv.base_url, api_key="sesame", max_retries=0)
        assert [m.id for m in good.models.list().data] == ["m"]
        assert httpx.get(srv.url + "/health").status_code == 200  # health needs no key
    finally:
        srv.close()


def test_browser_pages_of_allowed_origins_may_call_the_server(model, tokenizer):
    srv = ServerThread(model, tokenizer, model_id="m", allow_origins=["http://ui.example"])
    try:
        preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
        ok = httpx.options(srv.base_url + "/chat/completions", headers={"Origin": "http://ui.example", **preflight})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "http://ui.example"
        other = httpx.options(srv.base_url + "/chat/completions", headers={"Origin": "http://evil.example", **preflight})
        assert "access-control-allow-origin" not in other.headers
    finally:
        srv.close()


class BaseModelTokenizer:
    """The tokenizer without its chat template (a base model's)."""

    has_chat_template = False

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_a_base_model_answers_completions_and_explains_that_chat_needs_a_template(model, tokenizer):
    srv = ServerThread(model, BaseModelTokenizer(tokenizer), model_id="m")
    try:
        r = post(srv.base_url + "/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400 and "/v1/completions" in r.json()["error"]["message"]
        r = post(srv.base_url + "/completions", {"model": "m", "prompt": "the sky", "max_tokens": 16, "steps": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    finally:
        srv.close()


def test_serve_reports_a_taken_port_before_loading(capsys):
    sock = bind("127.0.0.1", 0)
    try:
        code = main(["serve", "--model", "/nonexistent", "--port", str(sock.getsockname()[1])])
    finally:
        sock.close()
    assert code == 1
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and "Traceback" not in err


# ------------------------------------------------------------------------ queue and cancellation


@pytest.fixture
def gated(model, tokenizer):
    """``(server, model)``: an in-process server whose passes run only when the test allows them."""
    gated = GatedModel(model)
    servers = []

    def start(**options) -> ServerThread:
        servers.append(ServerThread(gated, tokenizer, model_id="m", **options))
        return servers[-1]

    yield start, gated
    gated.allow(1000)
    for srv in servers:
        srv.close()


def drafted(max_tokens: int, steps: int) -> dict:
    """A streamed chat request with drafts (model "m")."""
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "steps": steps,
            "stream": True, "stream_options": {"include_drafts": True}}


def test_a_full_queue_answers_503_with_retry_after(gated):
    start, model = gated
    srv = start(max_queue=1)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "steps": 2}
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, srv.base_url + "/chat/completions", body)
        wait_until(lambda: srv.worker.running is not None, what="the first request to run")
        waiting = pool.submit(post, srv.base_url + "/chat/completions", body)
        wait_until(lambda: srv.worker.queued == 1, what="the second request to wait")
        r = post(srv.base_url + "/chat/completions", body)
        assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
        assert r.json()["error"]["code"] == "overloaded"
        model.allow(100)
        assert running.result().status_code == 200 and waiting.result().status_code == 200


@contextlib.contextmanager
def after_first_pass(srv, model, body):
    """Stream ``body`` with only one pass allowed; yield the rest of the chunks after its draft."""
    model.allow(1)
    with httpx.stream("POST", srv.base_url + "/chat/completions", json=body, timeout=30) as r:
        chunks = sse_chunks(r)
        assert "role" in next(chunks)["choices"][0]["delta"]
        assert next(chunks)["draft"]["step"] == 1
        yield chunks


def test_a_client_that_disconnects_cancels_its_generation_at_the_next_pass(gated):
    start, model = gated
    srv = start()
    with after_first_pass(srv, model, drafted(256, 8)):
        pass
    # The connection is closed; the worker waits for its second pass (or saw the cancellation
    # before asking for it).
    job = srv.worker.running
    wait_until(lambda: job is None or job.cancelled, what="the job to be cancelled")
    model.allow(1000)
    wait_until(lambda: srv.worker.counts["cancelled"] == 1, what="the worker to stop")
    assert model.passes <= 2
    ok = post(srv.base_url + "/chat/completions", {**drafted(16, 8), "stream": False, "stream_options": None})
    assert ok.status_code == 200


def test_shutting_down_ends_open_streams_with_an_error_and_refuses_new_requests(gated):
    start, model = gated
    srv = start()
    with after_first_pass(srv, model, drafted(64, 4)) as chunks:
        srv.worker.shutdown()  # what Ctrl-C / SIGTERM does first
        model.allow(1000)
        rest = list(chunks)
    assert rest[-1]["error"]["code"] == "shutting_down"
    refused = post(srv.base_url + "/chat/completions", {**drafted(16, 4), "stream": False, "stream_options": None})
    assert refused.status_code == 503


# ----------------------------------------------------------------------------------------- load

LOAD_SETTINGS = {"steps": 2, "max_tokens": 16}


def test_sixteen_concurrent_clients_get_their_own_seeded_results(server, model_id, model, tokenizer):
    jobs = [(f"{QUESTIONS[i % len(QUESTIONS)]} {i}", 100 + i) for i in range(64)]

    def client_run(k: int) -> list[tuple[int, str]]:
        c = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
        out = []
        for i in range(k * 4, k * 4 + 4):
            question, seed = jobs[i]
            stream = i % 2 == 0
            r = chat(c, model_id, question, seed, max_tokens=LOAD_SETTINGS["max_tokens"], steps=2, stream=stream)
            text = "".join(x.choices[0].delta.content or "" for x in r if x.choices) if stream else \
                r.choices[0].message.content
            out.append((i, text))
        return out

    with ThreadPoolExecutor(16) as pool:
        results = dict(pair for part in pool.map(client_run, range(16)) for pair in part)
    assert len(results) == 64
    for i, (question, seed) in enumerate(jobs):
        assert results[i] == direct_chat(model, tokenizer, question, seed, **LOAD_SETTINGS).text, f"request {i}"


CLIENT = """
import sys, httpx
body = {"model": sys.argv[2], "messages": [{"role": "user", "content": "the sky"}], "max_tokens": 4000,
        "steps": 48, "stream": True, "stream_options": {"include_drafts": True}}
with httpx.stream("POST", sys.argv[1] + "/chat/completions", json=body, timeout=60) as r:
    for line in r.iter_lines():
        print(line, flush=True)
"""


def test_a_client_killed_mid_stream_leaves_the_server_serving(server, model_id, client):
    before = httpx.get(server.url + "/health").json()
    proc = subprocess.Popen([sys.executable, "-c", CLIENT, server.base_url, model_id], stdout=subprocess.PIPE, text=True)
    try:
        while not proc.stdout.readline().startswith("data: "):
            pass
        assert proc.stdout.readline() is not None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_until(lambda: httpx.get(server.url + "/health").json()["busy"] is False, timeout=30, what="an idle server")
    after = httpx.get(server.url + "/health").json()
    assert after["cancelled"] + after["completed"] == before["cancelled"] + before["completed"] + 1
    assert after["failed"] == before["failed"]
    assert chat(client, model_id, QUESTIONS[0], seed=1).choices[0].finish_reason in ("stop", "length")


def test_memory_after_200_requests_stays_within_10_percent_of_after_20(server, model_id):
    c = httpx.Client(timeout=60)
    url = server.base_url + "/chat/completions"

    def request(i: int) -> None:
        body = {"model": model_id, "messages": [{"role": "user", "content": f"{QUESTIONS[i % 5]} {i}"}],
                "seed": i, "max_tokens": 16, "steps": 1, "stream": i % 2 == 0,
                **({"stream_options": {"include_drafts": True}} if i % 4 == 0 else {})}
        assert c.post(url, json=body).status_code == 200

    for i in range(20):
        request(i)
    after_20 = server.rss_bytes
    for i in range(20, 200):
        request(i)
    after_200 = server.rss_bytes
    assert after_200 <= 1.10 * after_20, f"RSS grew from {after_20 / 2**20:.0f} to {after_200 / 2**20:.0f} MiB"
