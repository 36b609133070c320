"""One run per output_dir: an exclusive lock file that works on shared storage (NFS) seen by a Ray cluster.

``output_dir/.hessian-spectrum.lock`` is created with O_EXCL (atomic on local filesystems and NFSv3+, unlike
flock) and holds the holder's host, pid, process start time, command and a heartbeat time that a daemon thread
rewrites every ``HEARTBEAT_SECONDS``. A lock is stale, and is taken over, when its holder is on this host and
its process is gone (at once), or when its heartbeat is older than ``STALE_SECONDS`` (a holder killed on
another node; this assumes the nodes' clocks agree within seconds, as NTP keeps them). The holder removes the
file when it ends. Readers (show, plot, report, compare) never take it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid

from hessian_core.files import atomic_text

from .config import ConfigError

LOCK_NAME = ".hessian-spectrum.lock"
HEARTBEAT_SECONDS = 5.0
STALE_SECONDS = 30.0


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


def describe(holder: dict) -> str:
    age = time.time() - float(holder.get("heartbeat", 0))
    return (f"pid {holder.get('pid')} on {holder.get('host')} (`{holder.get('command', '?')}`, started "
            f"{holder.get('started_at', '?')}, heartbeat {age:.0f} s ago)")


class OutputLock:
    """Held from ``acquire()`` to ``release()`` (or use as a context manager)."""

    def __init__(self, output_dir: str, *, label: str = "output_dir"):
        self.dir = output_dir
        self.label = label
        self.path = os.path.join(output_dir, LOCK_NAME)
        self.token = uuid.uuid4().hex
        self.lost = False  # another process took the lock over (our heartbeat stopped for STALE_SECONDS)
        self.created_dir = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _content(self, started_at: str) -> str:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                           "token": self.token, "started_at": started_at, "heartbeat": time.time(),
                           "command": " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))})

    def read(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, ValueError):  # being written right now (or garbage): treat as held, fresh
            return {"heartbeat": time.time(), "host": "?", "pid": "?"}

    def stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"], holder.get("pid_start"))
        return time.time() - float(holder.get("heartbeat", 0)) > STALE_SECONDS

    def acquire(self) -> OutputLock:
        try:
            self.created_dir = not os.path.isdir(self.dir)
            os.makedirs(self.dir, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"output_dir {self.dir!r} cannot be written: {e.strerror or e}") from None
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = self.read()
                if holder is None:
                    continue  # released in between
                if not self.stale(holder):
                    raise ConfigError(f"{self.label} {self.dir!r} is in use by {describe(holder)}; wait for it to "
                                      f"finish or stop it (a lock whose heartbeat stops is taken over after "
                                      f"{STALE_SECONDS:g} s)") from None
                self._take_over(holder)
                continue
            except OSError as e:
                raise ConfigError(f"output_dir {self.dir!r} cannot be written: {e.strerror or e}") from None
            with os.fdopen(fd, "w") as f:
                f.write(self._content(self.started_at))
            self._thread = threading.Thread(target=self._beat, name="output-lock", daemon=True)
            self._thread.start()
            return self
        raise ConfigError(f"{self.label} {self.dir!r}: another process is taking its lock over at the same time")

    def _take_over(self, holder: dict) -> None:
        """Move the stale lock aside, unless it changed since it was read (another taker won)."""
        from .progress import log

        aside = f"{self.path}.stale-{self.token}"
        if self.read() != holder:
            return
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        os.unlink(aside)
        log(f"taking over the stale lock of {self.dir} held by {describe(holder)}")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            holder = self.read()
            if holder is None or holder.get("token") != self.token:
                self.lost = True
                return
            try:
                atomic_text(self.path, self._content(self.started_at))
            except OSError:
                pass  # a full or briefly unreachable disk: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
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
