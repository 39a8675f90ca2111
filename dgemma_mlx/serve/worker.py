"""The generation worker: one thread that owns the model and its prefix cache.

Requests become :class:`Job` s in a bounded queue and are generated one at a time, in order, on
the worker thread (the web server's event loop never runs MLX). A job's events go to its
``on_event`` callback as they happen; a job cancelled by its client (:meth:`Job.cancel`) stops at
the next denoising pass.

The prefix cache survives from one job to the next, with the protocol of
:class:`~dgemma_mlx.chat.ChatSession`: a job names a ``split`` point in its prompt (for a chat, the
end of the conversation before the generation prompt: the point the conversation's next request
shares). The cache is rewound to the longest prefix it shares with the new prompt (to the latest
checkpoint at or before it, as sliding-window layers require), the rest of the prompt up to
``split`` is encoded and checkpointed, and generation encodes the remainder. A client that sends
the whole conversation every turn (the OpenAI API is stateless) therefore only pays for the new
tokens. Between jobs the cache is kept only while it holds at most ``cache_bytes``. A job's images
(processed) go through the vision tower here, only those the cache does not already hold (images
are told apart by content digests, not by their image tokens).
"""

from __future__ import annotations

import queue
import threading
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Optional, Sequence, Union

import mlx.core as mx
import numpy as np
from mlx_lm.utils import common_prefix_len

from ..errors import DGemmaError
from ..events import CommitEvent, EndEvent, Event, PassEvent
from ..generate import GenerationSettings, stream_generate
from ..image_processing import ProcessedImage
from ..multimodal import PromptImage, encode_image, features_of, image_key, image_runs, resume_point

DEFAULT_CACHE_BYTES = 4 << 30
SHUTTING_DOWN = "the server is shutting down"


@dataclass(frozen=True)
class Started:
    """The job left the queue: its prompt is ``prompt_tokens`` long, ``cached_tokens`` of which were
    reused from the cache."""

    prompt_tokens: int
    cached_tokens: int


@dataclass(frozen=True)
class Finished:
    """The job is over: ``status`` is ``"done"`` (an :class:`EndEvent` was delivered),
    ``"cancelled"`` or ``"error"`` (``message`` says why; ``user_error`` when the request was at
    fault rather than the server)."""

    status: Literal["done", "cancelled", "error"]
    message: str = ""
    user_error: bool = False


JobEvent = Union[Started, Event, Finished]


class QueueFull(Exception):
    """The worker's queue holds ``max_queue`` waiting jobs already."""


class Job:
    """One generation.

    Args:
        ids: the whole prompt (token ids).
        split: tokens ``ids[:split]`` form a reusable prefix (``0 <= split < len(ids)``).
        settings: sampling settings.
        on_event: called on the worker thread with :class:`Started`, the generation's events
            (:class:`PassEvent` s only when ``drafts``) and, last, :class:`Finished`.
        drafts: deliver a :class:`PassEvent` per pass.
        images: the :class:`~dgemma_mlx.image_processing.ProcessedImage` s of the prompt's image
            tokens, in order.
        events: ``events(model, tokenizer)`` -> the events of a generation that runs in a cache of
            its own (infilling), instead of :func:`stream_generate` continuing the shared cache
            (``split`` is then unused).
    """

    def __init__(
        self,
        ids: Sequence[int],
        split: int,
        settings: GenerationSettings,
        on_event: Callable[[JobEvent], None],
        *,
        drafts: bool = False,
        images: Sequence[ProcessedImage] = (),
        events: Optional[Callable[[Any, Any], Iterator[Event]]] = None,
    ):
        if not 0 <= split < len(ids):
            raise ValueError(f"split {split} outside a prompt of {len(ids)} tokens")
        self.ids = [int(t) for t in ids]
        self.split = split
        self.settings = settings
        self.on_event = on_event
        self.drafts = drafts
        self.images = list(images)
        self.image_keys = [image_key(im) for im in self.images]
        self.events = events
        self._cancelled = threading.Event()
        self._completed = False

    def cancel(self, *, completed: bool = False) -> None:
        """Stop at the next pass. ``completed``: the reply is already whole (a stop string was
        found), so the job counts as completed rather than cancelled."""
        self._completed = self._completed or completed
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()


class GenerationWorker:
    """Runs :class:`Job` s one at a time on its own thread.

    Args:
        model, tokenizer: from :func:`dgemma_mlx.load`.
        max_queue: jobs that may wait (beyond the one running); :meth:`submit` raises
            :class:`QueueFull` past it.
        cache_bytes: the prefix cache is kept between jobs only while it is at most this big.
    """

    def __init__(self, model, tokenizer, *, max_queue: int = 32, cache_bytes: int = DEFAULT_CACHE_BYTES):
        if max_queue < 1:
            raise DGemmaError(f"the queue needs room for at least one request (got {max_queue})")
        self.model = model
        self.tokenizer = tokenizer
        self.max_queue = max_queue
        self.cache_bytes = cache_bytes
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self.running: Optional[Job] = None
        self._queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        self._thread = threading.Thread(target=self._run, name="dgemma-generation", daemon=True)
        self._closed = False
        self._new_cache()
        _materialize(model)

    # -- control ---------------------------------------------------------------------------------

    def start(self) -> "GenerationWorker":
        self._thread.start()
        return self

    def shutdown(self) -> None:
        """Refuse new jobs and cancel the running and waiting ones, without waiting (safe in a
        signal handler): their consumers get ``Finished("cancelled", SHUTTING_DOWN)``."""
        self._closed = True
        job = self.running
        if job is not None:
            job.cancel()

    def close(self, timeout: float = 10.0) -> None:
        """:meth:`shutdown`, then wait for the thread to finish the cancelled jobs and stop."""
        self.shutdown()
        if not self._thread.is_alive():
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if job is not None:
                    self._finish(job, Finished("cancelled"))
            return
        self._queue.put(None)
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises :class:`QueueFull` when the queue is full."""
        if self._closed:
            raise QueueFull(SHUTTING_DOWN)
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self.max_queue} requests are already waiting")

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    @property
    def cached_tokens(self) -> int:
        return self.cache.offset

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled or self._closed:
                self._finish(job, Finished("cancelled"))
                continue
            self.running = job
            try:
                finished = self._generate(job)
            except BaseException as e:  # noqa: BLE001 - the thread must outlive any one job
                traceback.print_exc()
                self._new_cache()
                finished = _failed(e)
            finally:
                self.running = None
            self._finish(job, finished)

    @property
    def alive(self) -> bool:
        """The worker thread is running (a dead worker would leave requests waiting forever)."""
        return self._thread.is_alive()

    def _finish(self, job: Job, finished: Finished) -> None:
        key = {"done": "completed", "cancelled": "cancelled", "error": "failed"}[finished.status]
        if finished.status == "cancelled" and job._completed:
            key = "completed"
        elif finished.status == "cancelled" and self._closed:
            finished = Finished("cancelled", SHUTTING_DOWN)
        self.counts[key] += 1
        _deliver(job, finished)

    def _generate(self, job: Job) -> Finished:
        own_cache = job.events is None
        try:
            prompt, cached, images = self._prepare(job) if own_cache else (job.ids, 0, [])
        except Exception as e:  # noqa: BLE001 - reported to the client, the worker keeps serving
            self._new_cache()
            return _failed(e)
        if not _deliver(job, Started(len(job.ids), cached)):
            job.cancel()
        if job.cancelled:
            return Finished("cancelled")
        if own_cache:
            events = stream_generate(
                self.model, self.tokenizer, prompt, cache=self.cache, settings=job.settings, images=images
            )
        else:
            events = job.events(self.model, self.tokenizer)
        ended, prompt_in = False, not own_cache
        try:
            for event in events:
                if not prompt_in:  # stream_generate encoded the prompt before its first event
                    self._ids += prompt
                    prompt_in = True
                if own_cache and isinstance(event, CommitEvent) and event.encoded:
                    self._ids += event.tokens
                if (job.drafts or not isinstance(event, PassEvent)) and not _deliver(job, event):
                    job.cancel()
                ended = isinstance(event, EndEvent)
                if job.cancelled and not ended:
                    break
        except Exception as e:  # noqa: BLE001
            events.close()
            if own_cache:
                self._new_cache()
            return _failed(e)
        events.close()
        if own_cache and not ended:
            self._restore()
        if self.cache.nbytes > self.cache_bytes:
            self._new_cache()
        return Finished("done") if ended else Finished("cancelled")

    # -- the cache -------------------------------------------------------------------------------

    def _new_cache(self) -> None:
        self.cache = self.model.make_cache()
        self._ids: list[int] = []
        self._safe = 0  # a length the cache can always be rewound to (a checkpoint, or 0)
        self._image_keys: list[str] = []  # the images whose tokens the cache holds

    def _prepare(self, job: Job) -> tuple[list[int], int, list[PromptImage]]:
        """Make the cache hold ``ids[:split]`` (reusing what it shares), checkpoint there; return
        the tokens generation must still encode, the number of tokens reused and the encoded
        images of those tokens."""
        ids, split, keys, args = job.ids, job.split, job.image_keys, self.model.args
        split, in_head = _split_before_images(ids, split, args)
        head = ids[:split]
        lcp, _ = resume_point(head, keys, common_prefix_len(self._ids, head), args, self._image_keys)
        keep = lcp
        if lcp < len(self._ids):
            keep = self.cache.rewind(lcp)
            del self._ids[keep:]
            self._safe = min(self._safe, keep)
        keep, first = resume_point(head, keys, keep, args)
        images = [encode_image(self.model, im) for im in job.images[first:]]
        if keep < split:
            try:
                features = features_of(images[: in_head - first])
                self.model.encode(mx.array(head[keep:], dtype=mx.int32)[None], self.cache, image_features=features)
            except BaseException:
                self._restore()
                raise
        self._ids = list(head)
        self._image_keys = keys[:in_head]
        self.cache.checkpoint()
        self._safe = split
        return ids[split:], keep, images[in_head - first :]

    def _restore(self) -> None:
        """After a cancelled or failed generation: rewind every layer to the last checkpoint."""
        n = self.cache.rewind(min(self._safe, len(self._ids)), force=True)
        del self._ids[n:]
        self._safe = n
        held = image_runs(np.asarray(self._ids), self.model.args.image_token_id)
        self._image_keys = self._image_keys[: len(held)]


def _split_before_images(ids: list[int], split: int, args) -> tuple[int, int]:
    """``split`` moved back so that no image straddles it, and the number of images before it."""
    runs = image_runs(np.asarray(ids), args.image_token_id)
    for a, b in runs:
        if a < split < b:
            split = a
    return split, sum(1 for a, _ in runs if a < split)


def _materialize(model) -> None:
    """Evaluate every array the model holds, private ones included (RoPE frequencies are built
    lazily): an unevaluated array belongs to the stream of the thread that made it, and the worker
    thread could not evaluate it."""
    arrays = []
    for module in model.modules():
        for value in list(vars(module).values()) + list(module.values()):
            if isinstance(value, mx.array):
                arrays.append(value)
    mx.eval(arrays)


def _deliver(job: Job, event: JobEvent) -> bool:
    """Hand ``event`` to the job's consumer; False when the consumer is gone."""
    try:
        job.on_event(event)
        return True
    except Exception:  # noqa: BLE001 - a vanished client must not stop the worker
        return False


def _failed(e: Exception) -> Finished:
    if isinstance(e, DGemmaError):
        return Finished("error", str(e), user_error=True)
    first = str(e).splitlines()[0] if str(e) else ""
    return Finished("error", f"generation failed: {type(e).__name__}{': ' + first if first else ''}")
