"""Helpers for the server tests: a ``dgemma serve`` subprocess, an in-process server on a thread,
a model whose denoising passes the test lets through one at a time, and an SSE reader."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import httpx

REPO = Path(__file__).resolve().parent.parent


class ServerProcess:
    """``python -m dgemma_mlx serve --model CHECKPOINT --port 0 ...`` on the loopback interface; its
    stderr goes to ``log`` (shown when it fails to start)."""

    def __init__(self, checkpoint: Path, log: Path, *args: str, timeout: float = 300.0):
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               "PYTHONFAULTHANDLER": "1"}
        self.log = Path(log)
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dgemma_mlx", "serve", "--model", str(checkpoint), "--port", "0", *args],
                stderr=err, stdout=subprocess.DEVNULL, text=True, env=env, cwd=REPO,
            )
        self.base_url = self._wait_ready(timeout)
        self.url = self.base_url[: -len("/v1")]

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            for line in self.log.read_text().splitlines():
                if line.startswith("Serving ") and " at " in line:
                    return line.rsplit(" at ", 1)[1].strip()
            time.sleep(0.05)
        self.close()
        raise RuntimeError("the server did not start:\n" + self.log.read_text())

    @property
    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class ServerThread:
    """``create_app(model, tokenizer, **options)`` served by uvicorn on a thread of this process."""

    def __init__(self, model, tokenizer, **options):
        import uvicorn

        from dgemma_mlx.serve import bind, create_app

        self.app = create_app(model, tokenizer, **options)
        self.sock = bind("127.0.0.1", 0)
        port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.base_url = self.url + "/v1"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)

    @property
    def worker(self):
        return self.app.state.worker

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


class GatedModel:
    """The model, with each denoising pass waiting for a permit from the test (:meth:`allow`)."""

    def __init__(self, model):
        self._model = model
        self._permits = threading.Semaphore(0)
        self.passes = 0

    def __getattr__(self, name):
        return getattr(self._model, name)

    def allow(self, n: int = 1) -> None:
        for _ in range(n):
            self._permits.release()

    def denoise(self, *args, **kwargs):
        if not self._permits.acquire(timeout=30):
            raise TimeoutError("the test never allowed this pass")
        self.passes += 1
        return self._model.denoise(*args, **kwargs)


def sse_chunks(response: httpx.Response) -> Iterator[dict]:
    """The JSON chunks of a server-sent-event stream, up to ``data: [DONE]``."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return
        yield json.loads(data)


def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def post(url: str, body: dict, headers: Optional[dict] = None, timeout: float = 60) -> httpx.Response:
    return httpx.post(url, json=body, headers=headers or {}, timeout=timeout)
