"""Atomic file writes: a file appears under its final name complete or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable


def atomic_write(path: str, write: Callable[[str], None], *, sync: bool = False) -> None:
    """Call ``write(tmp_path)`` on a hidden temporary beside ``path``, then rename it into place (atomic on one
    filesystem). The temporary, ``.NAME.XXXX.tmp``, is removed if ``write`` fails; ``sync`` fsyncs it first."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to the rest of a team
    try:
        write(tmp)
        if sync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_text(path: str, text: str, *, sync: bool = False) -> None:
    """Atomically write a UTF-8 text file."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write, sync=sync)
