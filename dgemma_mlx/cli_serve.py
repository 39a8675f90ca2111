"""``dgemma convert`` and ``dgemma serve``: the checkpoint converter and the OpenAI-compatible server
(the library behind them: :mod:`dgemma_mlx.convert`, :mod:`dgemma_mlx.serve`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .cli import Adapter, ModelOpt, _option, app, check_utf8, default_model, err, load_with_status, user_errors
from .errors import DGemmaError


@app.command()
@user_errors
def convert(
    hf_path: str = _option(..., "--hf-path", metavar="PATH", help="Original checkpoint: local directory or repo id."),
    mlx_path: str = _option(..., "--mlx-path", metavar="PATH", help="Output directory."),
    quantize: bool = typer.Option(
        False, "--quantize", "-q", metavar="", help="Quantize (experts at --q-bits, the rest at 8)."
    ),
    q_bits: int = typer.Option(4, "--q-bits", metavar="N", help="Bits of the expert weights: 4 or 8."),
    q_group_size: int = typer.Option(64, "--q-group-size", metavar="N", help="Quantization group size: 32, 64 or 128."),
    dtype: Optional[str] = _option(
        None, "--dtype", metavar="DTYPE", help="float16, bfloat16 or float32 (default: the source dtype)."
    ),
    force: bool = typer.Option(False, "--force", metavar="", help="Replace an existing --mlx-path."),
    text_only: bool = typer.Option(
        False, "--text-only", metavar="", help="Drop the vision tower (the output cannot read images)."
    ),
):
    """Convert a Hugging Face DiffusionGemma checkpoint to MLX (optionally quantized)."""
    check_utf8(hf_path, "--hf-path")
    check_utf8(mlx_path, "--mlx-path")
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from .convert import convert as run_convert

    progress = Progress(
        TextColumn("[bold]Converting"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    )
    task = None

    def report(stage: str, done: int, total: int) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task(stage, total=total)
        progress.update(task, completed=done)

    with progress:
        out = run_convert(
            hf_path, mlx_path, quantize=quantize, q_bits=q_bits, q_group_size=q_group_size,
            dtype=dtype, force=force, progress=report, text_only=text_only,
        )
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    err.print(f"Wrote {out} ({size / 2**30:.2f} GiB)")


@app.command()
@user_errors
def serve(
    model: Optional[str] = ModelOpt,
    adapter: Optional[str] = Adapter,
    host: str = typer.Option(
        "127.0.0.1", "--host", metavar="HOST", help="Address to listen on (0.0.0.0: every interface)."
    ),
    port: int = typer.Option(8080, "--port", metavar="N", help="Port to listen on (0: any free port)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="DGEMMA_API_KEY", show_envvar=False, show_default=False, metavar="KEY",
        help="Require 'Authorization: Bearer KEY' (default: $DGEMMA_API_KEY).",
    ),
    served_name: Optional[str] = _option(
        None, "--served-model-name", metavar="NAME", help="Model id clients use (default: --model)."
    ),
    max_queue: int = typer.Option(
        32, "--max-queue", metavar="N", help="Requests that may wait; more get 503 with Retry-After."
    ),
    cache_gb: float = typer.Option(
        4.0, "--cache-gb", metavar="GB", help="Keep the prefix cache between requests up to this size."
    ),
    allow_origin: Optional[list[str]] = _option(
        None, "--allow-origin", metavar="ORIGIN",
        help="A web origin whose pages may call the server (CORS; repeatable; '*': any).",
    ),
):
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, streamed drafts)."""
    from .serve import bind, serve as run_server

    if not 0 <= port <= 65535:
        raise DGemmaError(f"--port must be between 0 and 65535 (got {port})")
    if max_queue < 1 or cache_gb < 0:
        raise DGemmaError("--max-queue must be at least 1 and --cache-gb at least 0")
    bind(host, port).close()  # a taken port is reported before the (slow) model load
    name = model or default_model()
    mdl, tok = load_with_status(name, adapter=adapter)
    model_id = served_name or name
    run_server(
        mdl, tok, host=host, port=port, model_id=model_id, api_key=api_key, max_queue=max_queue,
        cache_bytes=int(cache_gb * 2**30), allow_origins=allow_origin or (),
        on_ready=lambda url: err.print(f"Serving {model_id} at {url}", soft_wrap=True, markup=False),
    )
