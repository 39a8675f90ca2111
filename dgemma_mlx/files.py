"""Atomic writes: what the user made is never left half-written.

A file is written to a temporary file beside it and moved into place with ``os.replace``; a
directory is built in a temporary directory beside it and swapped in at the end (an existing one is
replaced only once the new one is complete). An existing file keeps its permission bits; new files
and directories get the umask's, as a plainly created one would (``mkstemp``/``mkdtemp`` create
them private).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator, Union

from .errors import DGemmaError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Union[str, Path], data: bytes, *, what: str = "write") -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a
    part. Errors are one-line :class:`DGemmaError` s ("cannot {what} '{path}': ...")."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise DGemmaError(f"cannot {what} '{path}': it is a directory")
    directory = path.parent if str(path.parent) else Path(".")
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        mode = 0o666 & ~_umask()
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        with os.fdopen(fd, "wb") as f:
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
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def atomic_write_text(path: Union[str, Path], data: str, *, what: str = "write") -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text (newlines written as given)."""
    return atomic_write_bytes(path, data.encode("utf-8"), what=what)


@contextlib.contextmanager
def atomic_dir(out: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary directory beside ``out``; on success it replaces ``out`` (with umask
    permissions throughout); on any error or interrupt it is removed and ``out`` is kept."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield tmp
        mask = _umask()
        os.chmod(tmp, 0o777 & ~mask)
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~mask)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the complete directory ``tmp`` to ``out``, swapping out an existing ``out`` last."""
    if not out.exists():
        tmp.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    old.rmdir()
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)
