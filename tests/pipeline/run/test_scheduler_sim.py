"""The scheduler at scale with no Ray, in one process: 1,000 fake groups and 100,000 tasks, groups joining,
lost while loading or running, preempted while idle, and tasks failing on one rank (bench/scheduler_sim.py's
fakes; the same code is the benchmark). And the failure policy's decisions one by one."""

import os
import sys

import pytest

from pipeline.run.failure_policy import FailureAction, FailurePolicy

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "bench"))
import scheduler_sim as sim  # noqa: E402


def test_every_task_finishes_exactly_once_at_1000_groups_and_100000_tasks():
    run = sim.simulate(groups=1000, tasks=100_000, seed=1)
    tally, backend = run.tally, run.backend
    # the fakes assert at every dispatch that no task runs on two groups at once (an AssertionError out of run)
    assert len(tally.finished) == 100_000 and set(tally.finished.values()) == {1}  # none lost, none twice
    assert not tally.wrong  # each result is its task's, from the group it was given to
    assert not backend.running and not backend.pending and not run.scheduler.queue
    # the run met every kind of event: losses while loading and running, preemptions, a task's own errors
    assert tally.lost > 100 and tally.requeued > 100 and run.scheduler.failures > 5
    assert tally.formed > 1000 and backend.preempted > 10


def test_the_fakes_catch_a_task_given_to_two_groups_at_once():
    backend = sim.FakeGroups()
    first, second = backend.request(0), backend.request(1)
    task = sim.FakeTask(task_id=7)
    first.execute(task)
    with pytest.raises(AssertionError, match="fake 7 runs on groups 0 and 1"):
        second.execute(task)


def test_a_kept_state_draws_its_task_to_the_group_that_keeps_it():
    """A calibration's group keeps probe 0's first HVP: probe 0 goes there even when another group is free first."""
    from dataclasses import dataclass

    @dataclass(frozen=True, kw_only=True)
    class Keeping(sim.FakeTask):
        def kept_affinity(self, result):
            return ("probe", 0)

    @dataclass(frozen=True, kw_only=True)
    class Probe(sim.FakeTask):
        @property
        def affinity(self):
            return ("probe", self.task_id)

    calm = sim.Chances(join=1.0, load=1.0, load_lost=0.0, lost=0.0, error=0.0, preempt_idle=0.0)
    run = sim.simulate(groups=8, tasks=0, seed=3, chances=calm)
    scheduler, tally = run.scheduler, run.tally
    given = {}
    scheduler.listeners.append(type("Given", (sim.SchedulerListener,), {
        "task_started": lambda self, index, task: given.setdefault(task.label, index)})())
    scheduler.submit([Keeping(task_id=100)])
    scheduler.run()  # every group forms at the first poll; the keeping task ends later
    assert scheduler.alive() == 8
    scheduler.submit([Probe(task_id=1), Probe(task_id=0)])
    scheduler.run()
    assert given["fake 0"] == given["fake 100"] != given["fake 1"]
    assert tally.finished[0] == tally.finished[1] == 1


class Lost(Exception):
    pass


class TaskError(Exception):
    pass


def policy(max_failures=2):
    return FailurePolicy(max_failures=max_failures, is_loss=lambda e: isinstance(e, Lost), max_losses_per_task=3)


def test_failure_policy_retries_losses_free_and_counts_task_errors():
    p, task = policy(), sim.FakeTask(task_id=1)
    assert p.decide(task=task, errors=[Lost()], loading=False).action is FailureAction.RETRY
    assert p.decide(task=task, errors=[TaskError(), Lost()], loading=False).action is FailureAction.RETRY
    assert p.failures == 0  # a loss anywhere in the group is a loss
    assert p.decide(task=task, errors=[TaskError()], loading=False).action is FailureAction.RETRY
    assert p.decide(task=task, errors=[TaskError()], loading=False).action is FailureAction.RETRY
    third = TaskError()
    decision = p.decide(task=task, errors=[third], loading=False)
    assert (decision.action, decision.error, p.failures) == (FailureAction.RAISE, third, 2)


def test_failure_policy_gives_up_on_a_task_that_keeps_losing_its_group_and_forgets_after_success():
    p, task = policy(), sim.FakeTask(task_id=1)
    for _ in range(3):
        assert p.decide(task=task, errors=[Lost()], loading=False).action is FailureAction.RETRY
    p.succeeded(task)  # the run of losses ends
    for _ in range(3):
        assert p.decide(task=task, errors=[Lost()], loading=False).action is FailureAction.RETRY
    last = Lost()
    decision = p.decide(task=task, errors=[last], loading=False)
    assert decision.action is FailureAction.GIVE_UP and decision.error.__cause__ is last
    assert p.decide(task=None, errors=[Lost()], loading=False).action is FailureAction.RETRY  # an idle group


@pytest.mark.parametrize("case", ["loading", "no retry", "non-finite"])
def test_failure_policy_stops_at_errors_that_would_repeat(case):
    from dataclasses import dataclass

    @dataclass(frozen=True, kw_only=True)
    class Once(sim.FakeTask):
        retry_on_error = False

    p = policy(max_failures=5)
    task = Once(task_id=0) if case == "no retry" else sim.FakeTask(task_id=0)
    error = FloatingPointError("alpha is nan") if case == "non-finite" else TaskError()
    decision = p.decide(task=task, errors=[error], loading=case == "loading")
    assert (decision.action, decision.error, p.failures) == (FailureAction.RAISE, error, 0)
