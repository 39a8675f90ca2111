"""Writing the user's files: atomically, and with the permissions their umask asks for.

Files and directories made with :mod:`tempfile` are private (0600 / 0700) whatever the umask; what
is built there and then moved into place gets the mode a plain ``open``/``mkdir`` would give.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union

from .errors import DGemmaError

PathLike = Union[str, "os.PathLike[str]"]


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode a new file (0666) or directory (0777) gets under the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file in the same directory and
    ``os.replace``: the old content stays intact until the new one is complete. Raises
    :class:`DGemmaError` with one line on failure."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DGemmaError(f"cannot save to '{path}': it is a directory")
    directory = path.parent if str(path.parent) else Path(".")
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        apply_umask(tmp)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise DGemmaError(f"cannot save to '{path}': {e.strerror or e}")
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path
