"""``dgemma serve``: an OpenAI-compatible local server that streams every refinement pass.

    from dgemma_mlx import load
    from dgemma_mlx.serve import create_app, serve

    model, tokenizer = load("mlx-community/diffusiongemma-26B-A4B-it-4bit")
    serve(model, tokenizer, model_id="diffusiongemma", port=8080)   # blocks; Ctrl-C stops it

Modules: :mod:`.protocol` (requests, responses and errors in OpenAI's shapes), :mod:`.reply`
(events to text deltas, stop strings, drafts), :mod:`.worker` (the single generation thread, its
bounded queue and the prefix cache kept across requests), :mod:`.app` (the Starlette app).
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Optional

from ..errors import DGemmaError
from .app import create_app

__all__ = ["create_app", "serve", "bind"]


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: any free port); a clear error when taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise DGemmaError(f"cannot listen on {host}:{port}: {e.strerror}")
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        sock.close()
        raise DGemmaError(f"cannot listen on {host}:{port}: {e.strerror or e}")
    sock.setblocking(False)
    return sock


def serve(
    model,
    tokenizer,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    on_ready: Optional[Callable[[str], None]] = None,
    log_level: str = "warning",
    **app_options: Any,
) -> None:
    """Serve until interrupted. ``on_ready`` is called with the base URL (``http://host:port/v1``)
    once the socket listens; ``app_options`` go to :func:`create_app`."""
    import uvicorn

    sock = bind(host, port)
    app = create_app(model, tokenizer, **app_options)
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    worker = app.state.worker

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            worker.shutdown()  # open streams end now (with an error chunk) instead of after a timeout
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    if on_ready is not None:
        on_ready(f"http://{shown}:{bound_port}/v1")
    server.run(sockets=[sock])

