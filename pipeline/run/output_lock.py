"""One run per output_dir: an exclusive lock file that works on shared storage (NFS) seen by a Ray cluster.

``output_dir/.hessian-spectrum.lock`` holds the holder's host, pid, process start time, command and a heartbeat
time. It is written whole to a temporary file and hard-linked into place, which fails if a lock exists (atomic
on local filesystems and NFS, unlike flock), so a lock this tool wrote is never empty or partial. A daemon thread
rewrites the heartbeat every ``HEARTBEAT_SECONDS`` in place, in the file this process created: a rename could
replace a lock that another process took over meanwhile. A lock is stale, and is taken over, when its holder
is on this host and its process is gone (at once), or when its heartbeat is older than ``STALE_SECONDS`` (a
holder killed on another node; this assumes the nodes' clocks agree within seconds, as NTP keeps them). A lock
that cannot be read (empty, garbage, a directory) is not this tool's; it is stale once unchanged (its mtime)
for ``STALE_SECONDS``. The holder removes the file when it ends. Readers (show, plot, report, compare) never
take it.

A holder whose lock was taken over (its heartbeat stalled: a suspended process, an unreachable disk) must write
nothing more there: ``ensure_held`` raises ``LockLost``, and the pipeline's writers and the run's poll loop
call it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import sys
import threading
import time
import uuid

from .config import ConfigError

LOCK_NAME = ".hessian-spectrum.lock"
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 30.0
NO_HARD_LINKS = (errno.EPERM, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP)  # link(2) on e.g. vfat, some FUSE

_held: list[OutputLock] = []  # the locks this process holds now


class LockLost(RuntimeError):
    """Another process took over this process's lock on a folder (its heartbeat had stopped for longer than
    ``STALE_SECONDS``); the other process owns the folder now, and this one stops without writing there."""


def ensure_held(path: str) -> None:
    """Raise ``LockLost`` if a lock this process holds on ``path``, or on a folder above it, was taken over."""
    real = os.path.realpath(path)
    for lock in list(_held):
        if os.path.commonpath([real, lock.real_dir]) == lock.real_dir:
            lock.ensure_held()


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or _process_start(pid) in (None, start)


def _parse(data: bytes) -> dict | None:
    """A lock's content, or None if it is not one (empty, garbage, a lock without a heartbeat)."""
    try:
        holder = json.loads(data)
    except ValueError:
        return None
    ok = isinstance(holder, dict) and isinstance(holder.get("heartbeat"), (int, float))
    return holder if ok else None


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def describe(holder: dict) -> str:
    if holder.get("unreadable"):
        return (f"an unreadable lock file ({holder['unreadable']}, last changed "
                f"{time.time() - holder['changed']:.0f} s ago)")
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"pid {holder.get('pid')} on {holder.get('host')} (`{holder.get('command', '?')}`, started "
            f"{holder.get('started_at', '?')}, heartbeat {age:.0f} s ago)")


def _read(path: str) -> dict | None:
    """The holder as the lock file at ``path`` records it, None if there is none. An unreadable lock reads as
    ``{"unreadable": why, "changed": its mtime, ...}``, which differs whenever the file changed."""
    try:
        with open(path, "rb") as f:
            data, st = f.read(), os.fstat(f.fileno())
    except FileNotFoundError:
        return None
    except OSError as e:  # a directory, no permission, an I/O error
        why = "a directory" if isinstance(e, IsADirectoryError) else (e.strerror or str(e))
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        except OSError:  # nothing known about it: never stale
            return {"unreadable": why, "changed": time.time()}
        return {"unreadable": why, "changed": st.st_mtime, "changed_ns": st.st_mtime_ns, "inode": st.st_ino}
    holder = _parse(data)
    if holder is not None:
        return holder
    return {"unreadable": "empty" if not data.strip() else "not a lock", "changed": st.st_mtime,
            "changed_ns": st.st_mtime_ns, "inode": st.st_ino}


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


class OutputLock:
    """Held from ``acquire()`` to ``release()`` (or use as a context manager)."""

    def __init__(self, output_dir: str, *, label: str = "output_dir"):
        self.dir = output_dir
        self.real_dir = os.path.realpath(output_dir)
        self.label = label
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.token = uuid.uuid4().hex
        self.lost = False  # another process took the lock over (our heartbeat stopped for STALE_SECONDS)
        self.created_dir = False
        self.started_at = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self) -> bytes:
        """The lock's content. The heartbeat comes last with a fixed width, so a reader that catches a rewrite
        half done still reads a valid lock."""
        fields = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                  "token": self.token, "started_at": self.started_at,
                  "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))}
        return (json.dumps(fields)[:-1] + f', "heartbeat": {time.time():.6f}}}').encode()

    def read(self) -> dict | None:
        return _read(self.path)

    def stale(self, holder: dict) -> bool:
        if holder.get("unreadable"):
            return time.time() - holder["changed"] > STALE_SECONDS
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"], holder.get("pid_start"))
        return time.time() - float(holder.get("heartbeat", 0)) > STALE_SECONDS

    def acquire(self) -> OutputLock:
        try:
            self.created_dir = not os.path.isdir(self.dir)
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise self._unwritable(e) from None
        self.real_dir = os.path.realpath(self.dir)
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            self._place()
        except BaseException:
            if self.created_dir:  # refused input leaves no empty output_dir behind
                with contextlib.suppress(OSError):
                    os.rmdir(self.dir)
            raise
        _held.append(self)
        self._thread = threading.Thread(target=self._beat, name="output-lock", daemon=True)
        self._thread.start()
        return self

    def _place(self) -> None:
        """Link a fully written temporary into place as the lock, taking over a stale lock found there."""
        tmp = f"{self.path}.{self.token}.tmp"
        try:
            self._create(tmp)
            for _ in range(3):
                if self._link(tmp):
                    return
                holder = self.read()
                if holder is None:
                    continue  # released in between
                if not self.stale(holder):
                    raise ConfigError(self._refusal(holder))
                self._take_over(holder)
            raise ConfigError(f"{self.label} {self.dir!r}: another process is taking its lock over at the same time")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _create(self, path: str) -> bool:
        """Create ``path`` exclusively, holding the lock's content in full; False if it exists. A write that
        fails (a full disk) removes it again."""
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise self._unwritable(e) from None
        try:
            try:
                _write_all(fd, self._content())
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            os.unlink(path)
            raise self._unwritable(e) from None
        return True

    def _link(self, tmp: str) -> bool:
        """Link ``tmp`` in place as the lock; False if a lock is there."""
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return os.stat(tmp).st_nlink > 1  # NFS: a retried link whose first try succeeded (see open(2))
        except OSError as e:
            if e.errno in NO_HARD_LINKS:  # created in place instead: a crash mid-write leaves an unreadable lock
                return self._create(self.path)
            raise self._unwritable(e) from None

    def _unwritable(self, err: OSError) -> ConfigError:
        return ConfigError(f"output_dir {self.dir!r} cannot be written: {err.strerror or err}")

    def _refusal(self, holder: dict) -> str:
        if holder.get("unreadable"):
            return (f"{self.label} {self.dir!r} is locked by {self.path}, which is unreadable "
                    f"({holder['unreadable']}, last changed {time.time() - holder['changed']:.0f} s ago) and so not "
                    f"written by hessian-spectrum; it is taken over once unchanged for {STALE_SECONDS:g} s, or "
                    f"remove it if no run uses this folder")
        return (f"{self.label} {self.dir!r} is in use by {describe(holder)}; wait for it to finish or stop it (a "
                f"lock whose heartbeat stops is taken over after {STALE_SECONDS:g} s)")

    def _take_over(self, holder: dict) -> None:
        """Move the stale lock aside and delete it. A live lock that got there between the check and the move
        (another taker's, or its holder beat again) is put back, by a link, which never replaces a newer one."""
        from .progress import log

        aside = f"{self.path}.stale-{self.token}"
        if self.read() != holder:
            return
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read(aside)
        if moved is not None and moved != holder and not moved.get("unreadable"):
            with contextlib.suppress(OSError):
                os.link(aside, self.path)
        else:
            log(f"taking over the stale lock of {self.dir} held by {describe(holder)}")
        _remove(aside)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                self._renew()
            except OSError:
                pass  # a full or briefly unreachable disk: the next beat tries again
            if self.lost:
                return

    def _renew(self) -> None:
        """Rewrite the heartbeat in place if the file at the lock's path is still this process's lock."""
        try:
            f = open(self.path, "r+b", buffering=0)
        except (FileNotFoundError, IsADirectoryError):
            self.lost = True
            return
        with f:
            holder = _parse(f.read())
            if holder is None or holder.get("token") != self.token:
                self.lost = True
                return
            data = self._content()
            os.pwrite(f.fileno(), data, 0)
            os.ftruncate(f.fileno(), len(data))

    def ensure_held(self) -> None:
        """Raise ``LockLost`` if another process took this lock over."""
        holder = self.read()
        if self.lost or holder is None or (not holder.get("unreadable") and holder.get("token") != self.token):
            self.lost = True
            now = "its lock file is gone" if holder is None else f"it is held by {describe(holder)}"
            raise LockLost(f"{self.label} {self.dir!r} was taken over by another run ({now}) while this process's "
                           f"heartbeat had stopped for over {STALE_SECONDS:g} s; this run stops and writes nothing "
                           f"more there")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with contextlib.suppress(ValueError):
            _held.remove(self)
        holder = self.read()
        if holder is not None and holder.get("token") == self.token:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        if self.created_dir:  # refused input leaves no empty output_dir behind
            with contextlib.suppress(OSError):
                os.rmdir(self.dir)

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
