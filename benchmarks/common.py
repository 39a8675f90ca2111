"""Small helpers shared by the benchmark workers: progress lines, memory, JSON results."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import numpy as np


def log(name: str, msg: str) -> None:
    print(f"[{name}] {msg}", file=sys.stderr, flush=True)


def maxrss_gb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1e9 if sys.platform == "darwin" else r * 1024 / 1e9


def write_json(path: Path, data: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:500]


def names_from(csv: str, known, what: str) -> list[str]:
    """The comma-separated names of ``csv``, each one of ``known``; exits with a one-line error
    naming the first unknown one (``what``: "shape", "configuration")."""
    names = [n.strip() for n in csv.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad or not names:
        sys.exit(f"error: unknown {what} '{bad[0] if bad else csv}' (choose from {', '.join(known)})")
    return names
