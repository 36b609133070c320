"""What a run tells its user while it works: tagged log lines on stderr and a progress bar over the HVP steps."""

from __future__ import annotations

import sys
import threading
import time

_log_context = threading.local()  # a sweep runs several runs in threads; each names itself in its log lines


def set_run_name(name: str | None) -> None:
    _log_context.run_name = name


def log(msg: str) -> None:
    name = getattr(_log_context, "run_name", None)
    tag = f"hessian-spectrum {name}" if name else "hessian-spectrum"
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


class Progress:
    """A tqdm bar over all HVP steps on a terminal; plain log lines otherwise. Shows the groups alive."""

    def __init__(self, total: int, *, bar: bool = True):
        self.total, self.done, self.last_line = total, 0, 0.0
        self.groups = ""
        self._high: dict[int, int] = {}  # probe id -> the highest step it has reported
        self.bar = None
        if bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="hvp", desc="probes", file=sys.stderr)

    def set_groups(self, alive: int, most: int) -> None:
        self.groups = f"groups {alive}/{most}"

    def update(self, *, probe_id: int, step: int, steps: int, hvp_seconds: float | None) -> None:
        """Probe ``probe_id`` finished Lanczos step ``step``. A probe that resumes from a checkpoint after its
        group was lost redoes the steps since that checkpoint: they are shown but not counted twice."""
        high = self._high.setdefault(probe_id, step - 1)  # a probe first seen at step s resumed from s - 1
        new = step > high
        self._high[probe_id] = max(high, step)
        text = f"probe {probe_id} step {step}/{steps}" + ("" if new else " (redone after a lost group)")
        if hvp_seconds is not None:
            text += f" | last HVP {hvp_seconds:.3f}s"
        self._advance(text, int(new), last=step == steps)

    def probe_finished(self, *, probe_id: int, steps: int, budget: int) -> None:
        """A probe stopped at ``steps`` of its ``budget`` (``lanczos.steps: auto``): the steps it will never take
        leave the total."""
        self.total -= max(0, budget - max(steps, self._high.get(probe_id, 0)))
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def grow(self, steps: int) -> None:
        """More work was queued (a wave of ``lanczos.probes: auto``)."""
        self.total += steps
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.refresh()

    def task_done(self, text: str) -> None:
        """One whole task (a block probe) finished: one progress step."""
        self._advance(text, 1, last=False)

    def _advance(self, text: str, count: int, *, last: bool) -> None:
        self.done += count
        if self.groups:
            text += f" | {self.groups}"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(count)
        elif time.monotonic() - self.last_line > 5 or last:
            self.last_line = time.monotonic()
            log(f"{self.done}/{self.total} HVP steps | {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
