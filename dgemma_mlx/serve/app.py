"""The HTTP server: an ASGI app (Starlette) in front of the generation worker.

Starlette rather than FastAPI: the server has four endpoints whose request checks and error
bodies must follow OpenAI's shapes exactly (400 with ``{"error": ...}``, not FastAPI's 422
validation errors), and its streaming is hand-made server-sent events; FastAPI's models and
dependency injection would be overridden everywhere for no gain. Uvicorn runs it.

Every request is tokenized off the event loop, checked (context length) and queued on the
:class:`~dgemma_mlx.serve.worker.GenerationWorker`; its events come back through an asyncio queue.
A task watches the connection: a client that goes away cancels its job at the next pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from typing import Any, AsyncIterator, Optional, Sequence

from mlx_lm.utils import common_prefix_len
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import DGemmaError
from ..events import CommitEvent, EndEvent, PassEvent
from ..generate import default_settings, render_chat
from ..image_processing import decode_image, load_image, process_image
from ..infill import DEFAULT_FILL_LENGTH, HOLE, plan_infill, stream_infill
from ..multimodal import check_image_context, expand_image_tokens, has_vision, template_messages
from . import protocol
from .protocol import APIError, ChatRequest, CompletionRequest, GenerationRequest, ResponseShape
from .reply import Delta, Reply
from .worker import DEFAULT_CACHE_BYTES, Finished, GenerationWorker, Job, QueueFull, Started

RETRY_AFTER_SECONDS = 5


def create_app(
    model,
    tokenizer,
    *,
    model_id: str = "dgemma",
    api_key: Optional[str] = None,
    max_queue: int = 32,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    allow_origins: Sequence[str] = (),
) -> Starlette:
    """The OpenAI-compatible app serving ``model`` under the name ``model_id``.

    ``api_key``: when set, ``/v1`` requests need ``Authorization: Bearer <api_key>``.
    ``allow_origins``: web origins whose pages may call the server from a browser (CORS; ``"*"``
    for any). The worker thread starts with the app (lifespan) and is ``app.state.worker``.
    """
    server = _Server(model, tokenizer, model_id, api_key, GenerationWorker(
        model, tokenizer, max_queue=max_queue, cache_bytes=cache_bytes
    ))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.worker.close)

    app = Starlette(
        routes=[
            Route("/health", server.health, methods=["GET"]),
            Route("/v1/models", server.models, methods=["GET"]),
            Route("/v1/chat/completions", server.chat, methods=["POST"]),
            Route("/v1/completions", server.completions, methods=["POST"]),
        ],
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal_error},
        lifespan=lifespan,
        middleware=[Middleware(CORSMiddleware, allow_origins=list(allow_origins), allow_methods=["GET", "POST"],
                               allow_headers=["*"])] if allow_origins else [],
    )
    app.state.worker = server.worker
    return app


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
    message = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
    return await _api_error(request, APIError(exc.status_code, message.get(exc.status_code, exc.detail), type=kind))


async def _internal_error(request: Request, exc: Exception) -> Response:
    return await _api_error(request, APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))


class _Server:
    def __init__(self, model, tokenizer, model_id: str, api_key: Optional[str], worker: GenerationWorker):
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.api_key = api_key
        self.worker = worker
        self.defaults = default_settings(model)
        self.context = int(model.args.max_position_embeddings)
        self.canvas = int(model.args.canvas_length)
        self.created = protocol.now()
        tokenizer.encode("warm up")  # the tokenizer's first call sets it up: not concurrently later

    # -- endpoints -------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        w = self.worker
        return JSONResponse({
            "status": "ok" if w.alive else "worker stopped", "model": self.model_id, "queued": w.queued,
            "busy": w.running is not None, "max_queue": w.max_queue, "cached_tokens": w.cached_tokens, **w.counts,
        }, status_code=200 if w.alive else 503)

    async def models(self, request: Request) -> Response:
        self._authorize(request)
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "dgemma-mlx",
                "max_model_len": self.context}
        return JSONResponse({"object": "list", "data": [card]})

    async def chat(self, request: Request) -> Response:
        self._authorize(request)
        req = protocol.parse_chat(await _json(request), self.model_id, self.defaults)
        ids, split, images = await run_in_threadpool(self._chat_ids, req)
        return await self._respond(request, req, ids, split, chat=True, images=images)

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        req = protocol.parse_completion(await _json(request), self.model_id, self.defaults)
        if req.suffix is not None:
            return await self._infill(request, req)
        ids = req.prompt if isinstance(req.prompt, list) else await run_in_threadpool(self.tokenizer.encode, req.prompt)
        vocab = int(self.model.args.vocab_size)
        if any(t >= vocab for t in ids):
            raise protocol.bad_request(f"'prompt' has token ids outside the vocabulary of {vocab}", "prompt")
        return await self._respond(request, req, list(ids), len(ids) - 1, chat=False)

    async def _infill(self, request: Request, req: CompletionRequest) -> Response:
        """``prompt`` + hole + ``suffix`` (:func:`dgemma_mlx.infill.stream_infill`); the answer is
        the hole's fill, of ``max_tokens`` tokens at most (default: infill's)."""
        plan = await run_in_threadpool(self._infill_plan, req)
        text = f"{req.prompt}<|fill|>{req.suffix}"
        length = plan.holes[0][1] - plan.holes[0][0]

        def events(model, tokenizer):
            return stream_infill(model, tokenizer, text, fill_length=length, settings=req.settings)

        return await self._respond(request, req, plan.prompt, 0, chat=False, events=events, fill=plan.holes[0])

    def _infill_plan(self, req: CompletionRequest):
        if not isinstance(req.prompt, str):
            raise protocol.bad_request("'suffix' needs a text prompt", "prompt")
        for name, text in (("prompt", req.prompt), ("suffix", req.suffix)):
            if HOLE.search(text):
                raise protocol.bad_request(f"'{name}' must not contain a <|fill|> marker", name)
        length = req.max_tokens or DEFAULT_FILL_LENGTH
        try:
            return plan_infill(self.model, self.tokenizer, [req.prompt, req.suffix], [length])
        except DGemmaError as e:
            raise protocol.bad_request(str(e), "suffix", code="context_length_exceeded" if "context" in str(e) else None)

    # -- helpers ---------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
            raise APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key")

    def _chat_ids(self, req: ChatRequest) -> tuple[list[int], int, list]:
        """The conversation's ids, its split point (the end of the conversation before the
        generation prompt, which the next turn shares) and its processed images."""
        if not getattr(self.tokenizer, "has_chat_template", False):
            raise protocol.bad_request(
                "this model has no chat template (a base model): send raw text to /v1/completions", "messages"
            )
        images = self._images(req)
        messages = template_messages(req.messages)
        try:
            ids = render_chat(self.tokenizer, messages, think=req.think)
            base = render_chat(self.tokenizer, messages, think=req.think, add_generation_prompt=False)
            if images:
                counts = [im.num_soft_tokens for im in images]
                ids = expand_image_tokens(ids, counts, self.model.args)
                base = expand_image_tokens(base, counts, self.model.args)
        except DGemmaError as e:
            raise protocol.bad_request(str(e), "messages")
        return ids, min(common_prefix_len(ids, base), len(ids) - 1), images

    def _images(self, req: ChatRequest) -> list:
        """Read and process the request's images (the vision tower runs on the worker)."""
        refs = [ref for m in req.messages for ref in m.get("images", ())]
        if not refs:
            return []
        if not has_vision(self.model):
            raise protocol.bad_request("this model is text-only (no vision tower): it cannot read images",
                                       refs[0].param)
        v = self.model.args.vision
        out = []
        for ref in refs:
            try:
                image = decode_image(ref.data, ref.param) if ref.data is not None else load_image(ref.path)
                out.append(process_image(image, req.image_tokens, patch_size=v.patch_size,
                                         pooling_kernel_size=v.pooling_kernel_size))
            except DGemmaError as e:
                raise protocol.bad_request(str(e), ref.param)
        return out

    async def _respond(
        self, request: Request, req: GenerationRequest, ids: list[int], split: int, *, chat: bool,
        events=None, fill: Optional[tuple[int, int]] = None, images=(),
    ) -> Response:
        if not ids:
            raise protocol.bad_request("the prompt is empty", "prompt")
        if images:
            try:
                check_image_context(self.model.args, 0, len(ids), sum(im.num_soft_tokens for im in images))
            except DGemmaError as e:
                raise protocol.bad_request(str(e), "messages", code="context_length_exceeded")
        if len(ids) + self.canvas > self.context:
            raise protocol.bad_request(
                f"This model's maximum context length is {self.context} tokens; the prompt has {len(ids)} "
                f"tokens and a reply needs room for one {self.canvas}-token block",
                "messages" if chat else "prompt", code="context_length_exceeded",
            )
        run = _Run(self.tokenizer, self.model, req, chat=chat, fill=fill)
        job = Job(ids, split, req.settings, run.on_event, drafts=req.include_drafts, events=events, images=images)
        try:
            self.worker.submit(job)
        except QueueFull as e:
            raise APIError(503, f"the server is busy ({e}); retry later", type="server_error", code="overloaded",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        shape = ResponseShape.new(chat, self.model_id)
        if req.stream:
            return StreamingResponse(
                _sse(run.stream(request, job, shape)), media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return JSONResponse(await run.collect(request, job, shape))


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise protocol.bad_request(f"the request body is not valid JSON: {e}", code="invalid_json")


async def _sse(chunks: AsyncIterator[dict]) -> AsyncIterator[str]:
    async for chunk in chunks:
        yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    yield "data: [DONE]\n\n"


class _Run:
    """One request's side of a job: turns worker events (on the worker thread) into
    :class:`Delta` s for the event loop, and the loop's side that sends them."""

    def __init__(self, tokenizer, model, req: GenerationRequest, *, chat: bool, fill=None):
        self.req = req
        self.reply = Reply(tokenizer, chat=chat, stops=req.stop, eos_ids=model.args.eos_token_ids, fill=fill)
        self.loop = asyncio.get_running_loop()
        self.items: asyncio.Queue = asyncio.Queue()
        self.started: Optional[Started] = None

    # worker thread
    def on_event(self, event) -> None:
        if isinstance(event, PassEvent):
            item: Any = self.reply.draft(event)
        elif isinstance(event, CommitEvent):
            item = self.reply.commit(event)
        elif isinstance(event, EndEvent):
            item = self.reply.end(event)
        else:
            item = event
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    # event loop
    def usage(self) -> dict:
        r, s = self.reply, self.started
        return protocol.usage(s.prompt_tokens if s else 0, s.cached_tokens if s else 0, r.completion_tokens,
                              r.passes, r.blocks)

    async def deltas(self, request: Request, job: Job) -> AsyncIterator[Delta]:
        """The job's deltas until its reply is finished; raises :class:`APIError` if it fails.
        The job is cancelled when the client disconnects or stops reading."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        try:
            while True:
                item = await self.items.get()
                if isinstance(item, Started):
                    self.started = item
                elif isinstance(item, Finished):
                    if item.status == "error":
                        if item.user_error:
                            raise protocol.bad_request(item.message)
                        raise APIError(500, item.message, type="server_error")
                    if item.message:  # cancelled by the server (shutting down)
                        raise APIError(503, item.message, type="server_error", code="shutting_down")
                    return  # cancelled: the client is gone
                else:
                    yield item
                    if item.finish_reason is not None:
                        job.cancel(completed=True)  # a stop string ended it; no-op after the end
                        return
        finally:
            watcher.cancel()
            if self.reply.finish_reason is None:
                job.cancel()

    async def collect(self, request: Request, job: Job, shape: ResponseShape) -> dict:
        async for _ in self.deltas(request, job):
            pass
        r = self.reply
        return shape.full(r.content, r.reasoning, r.finish_reason or "stop", self.usage())

    async def stream(self, request: Request, job: Job, shape: ResponseShape) -> AsyncIterator[dict]:
        if shape.chat:
            yield shape.chunk({"role": "assistant", "content": ""})
        try:
            async for delta in self.deltas(request, job):
                if delta.draft is not None:
                    yield shape.draft_chunk(delta.draft)
                for name, text in delta.pieces:
                    yield shape.chunk({name: text})
                if delta.finish_reason is not None:
                    yield shape.chunk({}, delta.finish_reason)
        except APIError as e:
            yield e.body()
            return
        if self.reply.finish_reason is not None and self.req.include_usage:
            yield shape.usage_chunk(self.usage())


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return
