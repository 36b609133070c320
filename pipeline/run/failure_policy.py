"""What the scheduler does when a group fails: retry the task on another group, or stop the run.

A loss (the node or an actor gone, a collective broken by a dead peer) costs nothing against
``cluster.max_failures``, which counts only errors raised by a task itself; a task whose group is lost more
than MAX_LOSSES_PER_TASK times in a row is failing its nodes rather than being preempted. Errors that would
only repeat stop the run at once: a failure while the model loads, a task that asks not to be retried (the
calibration), a non-finite Lanczos coefficient.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

MAX_LOSSES_PER_TASK = 10


class FailureAction(enum.Enum):
    RETRY = "retry"  # requeue the task (first in line) and request a replacement group
    RAISE = "raise"  # the task's own error stops the run
    GIVE_UP = "give_up"  # the task lost its group too often in a row: stop the run with that


@dataclass(frozen=True, kw_only=True)
class FailureDecision:
    action: FailureAction
    lost: bool  # a loss (not an error of the task itself)
    error: BaseException | None = None  # what to raise (RAISE, GIVE_UP)


class FailurePolicy:
    """Counts failures and losses; ``decide`` is called once per failed group, ``succeeded`` once per task
    that finished (its run of losses ends)."""

    def __init__(self, *, max_failures: int, is_loss: Callable[[BaseException], bool],
                 max_losses_per_task: int = MAX_LOSSES_PER_TASK):
        self.max_failures, self.is_loss, self.max_losses_per_task = max_failures, is_loss, max_losses_per_task
        self.failures = 0
        self.losses: dict[str, int] = {}

    def decide(self, *, task, errors: list[BaseException], loading: bool) -> FailureDecision:
        """The decision for a group whose ranks raised ``errors`` while loading or running ``task`` (None: idle)."""
        lost = any(self.is_loss(e) for e in errors)
        if not lost:
            cause = getattr(errors[0], "cause", errors[0])  # a RayTaskError's cause is the task's own exception
            if (loading or (task is not None and not task.retry_on_error) or isinstance(cause, FloatingPointError)
                    or self.failures >= self.max_failures):
                return FailureDecision(action=FailureAction.RAISE, lost=False, error=errors[0])
            self.failures += 1
        if task is not None:
            count = self.losses[task.label] = self.losses.get(task.label, 0) + int(lost)
            if count > self.max_losses_per_task:
                error = RuntimeError(f"{task.label} lost its group {count} times; giving up")
                error.__cause__ = errors[0]
                return FailureDecision(action=FailureAction.GIVE_UP, lost=lost, error=error)
        return FailureDecision(action=FailureAction.RETRY, lost=lost)

    def succeeded(self, task) -> None:
        self.losses.pop(task.label, None)
