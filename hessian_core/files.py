"""Atomic file writes: a file appears under its final name complete or not at all."""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable

FULL_DISK_BYTES = 1 << 20  # less free space than this after a failed write: the disk filled up


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
    except BaseException as err:
        full = _disk_full(err, folder)  # before the temporary is removed and frees its space
        if os.path.exists(tmp):
            os.unlink(tmp)
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", path) from err
        raise


def _free_bytes(folder: str) -> int:
    return shutil.disk_usage(folder).free


def _disk_full(err: BaseException, folder: str) -> bool:
    """Writers report a full disk in their own words (torch.save: "unexpected pos"); name it for what it is."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    if not isinstance(err, Exception):
        return False
    try:
        return _free_bytes(folder) < FULL_DISK_BYTES
    except OSError:
        return False


def atomic_text(path: str, text: str, *, sync: bool = False) -> None:
    """Atomically write a UTF-8 text file."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write, sync=sync)
