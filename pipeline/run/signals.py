"""SIGTERM and SIGINT stop a run cooperatively: both raise ``Interrupted`` in the main thread, the run stops its
groups and records ``status: interrupted`` with the signal, and the CLI exits 128 + the signal's number (130 for
SIGINT, 143 for SIGTERM), which is what ``ray job stop``, Kubernetes, Slurm and ``timeout`` expect.

``ray.init`` installs its own SIGTERM handler (``sys.exit``, which ends in an abort and a C++ stack dump while
Ray's threads are alive), so ``install()`` is called again right after every ``ray.init``. ``ray.shutdown``
runs inside ``deferred()``: a signal then is raised once Ray is down, not halfway through its teardown.
"""

from __future__ import annotations

import contextlib
import signal
import threading

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by a signal; everything finished so far is kept and the run is resumable."""

    def __init__(self, signum: int = signal.SIGINT):
        self.signum = signum
        super().__init__(f"interrupted by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


_received: list[int] = []  # signals received, in order: Ray turns an exception raised inside ray.wait/get
# into a plain KeyboardInterrupt, which loses the signal; this keeps it


def _handler(signum, frame) -> None:
    _received.append(signum)
    raise Interrupted(signum)


def install() -> None:
    """Route SIGINT and SIGTERM to ``Interrupted`` (only the main thread may set handlers; elsewhere a no-op)."""
    if threading.current_thread() is threading.main_thread():
        for sig in HANDLED:
            signal.signal(sig, _handler)


@contextlib.contextmanager
def deferred():
    """SIGINT and SIGTERM received inside are raised as ``Interrupted`` when it ends, not where they land: for
    a teardown that must not be cut in half (``ray.shutdown`` stopped between tearing down its core worker and
    dropping its handle leaves a process that any released Ray object ends). The handlers are installed anew
    at the end. Outside the main thread, where no handler runs, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []

    def hold(signum, frame) -> None:
        _received.append(signum)
        held.append(signum)

    for sig in HANDLED:
        signal.signal(sig, hold)
    try:
        yield
    finally:
        install()
        if held:
            raise Interrupted(held[0])


def as_interrupted(err: KeyboardInterrupt) -> Interrupted:
    """``err`` as an ``Interrupted`` naming its signal: its own, else the first one received, else SIGINT."""
    if isinstance(err, Interrupted):
        return err
    return Interrupted(_received[0] if _received else signal.SIGINT)


def signal_of(err: KeyboardInterrupt) -> str:
    """The signal's name for run.json."""
    return as_interrupted(err).signal_name
