"""Atomic file writes: a temporary file in the same directory, then ``os.replace``."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Union

from .errors import DGemmaError


def atomic_write_text(path: Union[str, Path], data: str, *, what: str = "write") -> Path:
    """Write ``data`` (UTF-8) to ``path`` so that readers see the old file or the whole new one,
    never a part. An existing file keeps its permission bits. Errors are one-line
    :class:`DGemmaError`\\ s ("cannot {what} '{path}': ...")."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DGemmaError(f"cannot {what} '{path}': it is a directory")
    directory = path.parent if str(path.parent) else Path(".")
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise DGemmaError(f"cannot {what} '{path}': {e.strerror or e}")
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path
