"""Helpers the recipes' evaluation scripts share: progress on stderr, a markdown table, the JSON
result written atomically, and the error handling of a command-line script."""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence


class Progress:
    """``label: done/total (rate, eta)`` lines on stderr, redrawn in place on a terminal and
    printed at most every ``every`` seconds otherwise."""

    def __init__(self, label: str, total: int, every: float = 10.0):
        self.label, self.total, self.every = label, total, every
        self.done = 0
        self.start = self.last = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def advance(self, n: int = 1, note: str = "") -> None:
        self.done += n
        now = time.perf_counter()
        if not self.tty and now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / max(rate, 1e-9)
        line = f"{self.label}: {self.done}/{self.total} ({rate:.2f}/s, eta {eta:.0f} s){' ' + note if note else ''}"
        if self.tty:
            sys.stderr.write("\r\033[K" + line + ("\n" if self.done >= self.total else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table (floats with 4 significant digits)."""
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    """``data`` as indented JSON at ``path``, atomically (readers never see half a file)."""
    from dgemma_mlx.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def script(main: Callable[[], None]) -> Callable[[], None]:
    """Run ``main`` as a command: a one-line error and exit 1 for bad input, 130 on Ctrl-C."""

    @functools.wraps(main)
    def run() -> None:
        from dgemma_mlx.errors import DGemmaError

        try:
            main()
        except DGemmaError as e:
            sys.stderr.write(f"error: {e}\n")
            raise SystemExit(1)
        except KeyboardInterrupt:
            sys.stderr.write("interrupted\n")
            raise SystemExit(130)

    return run
