"""The scheduler at scale without Ray: fake groups (``FakeGroups``, a ``pipeline.run.scheduler.GroupBackend``) that
join at random, load, run tasks, and are lost, preempted or fail at random, in one process.

``simulate`` runs the real ``pipeline.run.scheduler.Scheduler`` over them and checks, as it goes, that no task
runs on two groups at once; tests/pipeline/run/test_scheduler_sim.py runs it at 1,000 groups and 100,000 tasks.
As a script it measures, per task count, the driver's CPU time per task (the scheduler's own, the fakes' time
taken out; the best of ``--repeats``) and the recording CPU time per finished task with the real Recorder
writing to a temporary run folder:

    python bench/scheduler_sim.py [--tasks 1000,10000,100000] [--groups-per-task 0.01]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from dataclasses import dataclass

from actors.records import GroupInfo
from actors.tasks import TaskRecord
from pipeline.run.scheduler import Scheduler, SchedulerListener, SchedulerSettings

# CPU time of this process: the machine the figures come from is shared, and the scheduler never waits here
clock = time.process_time


class FakeLoss(Exception):
    """The group's node went away (a loss, as Ray's RayActorError)."""


class FakeTaskError(Exception):
    """An error of the task itself (counts against max_failures)."""


@dataclass(frozen=True, kw_only=True)
class FakeTask(TaskRecord):
    task_id: int

    @property
    def label(self) -> str:
        return f"fake {self.task_id}"

    def run(self, ctx):  # never sent anywhere: the fake groups play the ranks
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class FakeResult:
    task_id: int
    group: int


class Handle:
    __slots__ = ("value", "error", "done", "on_grace")

    def __init__(self):
        self.value = self.error = self.on_grace = None
        self.done = False

    def resolve(self, value=None, error=None) -> None:
        self.value, self.error, self.done = value, error, True


@dataclass(frozen=True, kw_only=True)
class Chances:
    """Per poll and per pending operation, the chance that it ends (and how)."""

    join: float = 0.3  # a pending placement is placed
    load: float = 0.5  # a loading group forms
    load_lost: float = 0.01  # ... or is lost while loading
    finish: float = 0.5  # a running task ends
    lost: float = 0.002  # ... with its group lost (node removed)
    error: float = 0.0005  # ... with an error of its own on one rank (its peer then fails or is lost)
    preempt_idle: float = 0.001  # per poll and idle group: preempted (found out at its next task)


class FakeGroup:
    def __init__(self, backend: FakeGroups, index: int):
        self.backend, self.index, self.num_workers = backend, index, backend.ranks
        self.bundle = {"CPU": 1}
        self.placed = Handle()
        self.dead = False
        self.running: str | None = None
        backend.pending[self] = ("place", [self.placed], None)

    def execute(self, task: FakeTask, *, progress=None) -> list[Handle]:
        backend = self.backend
        started = clock()
        assert self.running is None, f"group {self.index} given {task.label} while running {self.running}"
        assert task.label not in backend.running, f"{task.label} runs on groups {backend.running[task.label]} and {self.index}"
        handles = [Handle() for _ in range(self.num_workers)]
        backend.idle.pop(self, None)
        if self.dead:  # preempted while idle: the call finds the actors gone
            for h in handles:
                h.resolve(error=FakeLoss())
        else:
            self.running = task.label
            backend.running[task.label] = self.index
            backend.pending[self] = ("task", handles, task)
        backend.fake_seconds += clock() - started
        return handles

    def shutdown(self, *, graceful: bool = True) -> None:
        self.dead = True
        self.backend.pending.pop(self, None)
        self.backend.idle.pop(self, None)
        if self.running is not None:  # the task dies with its group
            del self.backend.running[self.running]
            self.running = None


class FakeGroups:
    """Fake groups of ``ranks`` ranks; randomness from ``seed``. ``pending`` holds every operation in flight."""

    def __init__(self, *, seed: int = 0, ranks: int = 2, chances: Chances = Chances()):
        self.rng, self.ranks, self.chances = random.Random(seed), ranks, chances
        self.pending: dict[FakeGroup, tuple[str, list[Handle], FakeTask | None]] = {}
        self.running: dict[str, int] = {}  # task label -> group index running it now
        self.idle: dict[FakeGroup, None] = {}  # formed groups with no task (a dict: a fixed order)
        self.fake_seconds = 0.0  # time spent in the fakes, not in the scheduler
        self.polls = self.preempted = 0

    # -- GroupBackend -----------------------------------------------------------------------------------
    def request(self, index: int) -> FakeGroup:
        return FakeGroup(self, index)

    def start(self, group: FakeGroup) -> list[Handle]:
        handles = [Handle() for _ in range(self.ranks)]
        self.pending[group] = ("load", handles, None)
        return handles

    @staticmethod
    def merge_infos(infos: list[GroupInfo]) -> GroupInfo:
        return infos[0]

    def wait(self, handles: list[Handle], *, num_returns: int, timeout: float) -> tuple[list, list]:
        started = clock()
        if timeout > 0 and num_returns == 1:  # the scheduler's poll: time passes
            self._tick()
        elif timeout > 0:  # a peer's fate after one rank failed
            for h in handles:
                if not h.done and h.on_grace is not None:
                    h.resolve(error=h.on_grace)
        ready = [h for h in handles if h.done]
        self.fake_seconds += clock() - started
        return ready, [h for h in handles if not h.done]

    @staticmethod
    def get(handle: Handle):
        if handle.error is not None:
            raise handle.error
        return handle.value

    @staticmethod
    def is_loss(error: BaseException) -> bool:
        return isinstance(error, FakeLoss)

    def progress_sink(self):
        return None

    def close(self) -> None:
        pass

    @staticmethod
    def release(group, *, graceful: bool, idle: bool) -> None:
        group.shutdown(graceful=graceful)

    def drain_progress(self) -> list:
        return []

    def check(self) -> None:
        pass

    def available(self) -> bool:
        return True

    # -- time passing -----------------------------------------------------------------------------------
    def _tick(self) -> None:
        self.polls += 1
        rng, c = self.rng, self.chances
        for group, (kind, handles, task) in list(self.pending.items()):
            r = rng.random()
            if kind == "place" and r < c.join:
                self._end(group, [True] * len(handles))
            elif kind == "load" and r < c.load_lost:
                self._end(group, error=FakeLoss())
            elif kind == "load" and r < c.load:
                info = GroupInfo(index=group.index, num_workers=self.ranks, num_params=1, load_seconds=0.0,
                                 peak_rss_mib_per_rank=[0.0], pids=[0], nodes=[f"node{group.index:05d}"])
                self._end(group, [info] * len(handles))
                self.idle[group] = None
            elif kind == "task" and r < c.finish:
                self._finish(group, handles, task)
        for group in [g for g in self.idle if rng.random() < c.preempt_idle]:
            self.preempted += 1
            group.dead = True  # its node is gone; the scheduler learns it at the group's next task

    def _finish(self, group: FakeGroup, handles: list[Handle], task: FakeTask) -> None:
        r, c = self.rng.random(), self.chances
        if r < c.lost:
            self._end(group, error=FakeLoss())
        elif r < c.lost + c.error:  # one rank raises; the other is lost or raises too, once waited for
            del self.pending[group]
            handles[0].resolve(error=FakeTaskError(task.label))
            for h in handles[1:]:
                h.on_grace = FakeLoss() if self.rng.random() < 0.5 else FakeTaskError(task.label)
        else:
            self._end(group, [FakeResult(task_id=task.task_id, group=group.index)] * len(handles))
            self.idle[group] = None
        del self.running[task.label]
        group.running = None

    def _end(self, group: FakeGroup, values: list | None = None, *, error: BaseException | None = None) -> None:
        _, handles, _ = self.pending.pop(group)
        for k, h in enumerate(handles):
            h.resolve(value=None if values is None else values[k], error=error)


class Tally(SchedulerListener):
    """Counts what the scheduler reports: each task's finishes (with the group it ran on), losses, requeues."""

    def __init__(self):
        self.finished: Counter = Counter()
        self.wrong: list[str] = []
        self.lost = self.requeued = self.formed = 0

    def task_finished(self, index: int, task, result) -> None:
        self.finished[task.task_id] += 1
        if result.task_id != task.task_id or result.group != index:
            self.wrong.append(f"{task.label} on group {index} came back as {result}")

    def group_formed(self, index: int, info) -> None:
        self.formed += 1

    def group_lost(self, index: int, *, task, lost: bool, cause: str) -> None:
        self.lost += 1

    def task_requeued(self, index: int, task) -> None:
        self.requeued += 1


@dataclass(frozen=True, kw_only=True)
class Simulation:
    tally: Tally
    backend: FakeGroups
    scheduler: Scheduler
    seconds: float  # CPU time of scheduler.run()

    @property
    def driver_seconds(self) -> float:
        return self.seconds - self.backend.fake_seconds


def simulate(*, groups: int, tasks: int, seed: int = 0, chances: Chances = Chances(),
             listeners=()) -> Simulation:
    """Run ``tasks`` fake tasks over ``groups`` fake groups to the end; no time is waited (polls are instant)."""
    backend = FakeGroups(seed=seed, chances=chances)
    tally = Tally()
    settings = SchedulerSettings(num_groups=groups, min_groups=1, max_failures=tasks,
                                 placement_timeout_seconds=3600.0, poll_seconds=1.0)
    scheduler = Scheduler(settings=settings, backend=backend, listeners=[tally, *listeners], log=lambda line: None)
    scheduler.submit(FakeTask(task_id=k) for k in range(tasks))
    started = clock()
    scheduler.run()
    return Simulation(tally=tally, backend=backend, scheduler=scheduler, seconds=clock() - started)


# -- recording time with the real Recorder ------------------------------------------------------------------
def recording_seconds_per_task(tasks: int, *, timed: int, steps: int = 10) -> tuple[float, float]:
    """The real Recorder, behind the scheduler's events (RecordingListener and the probe handler), holding
    ``tasks - timed`` finished probes read back from its run folder (a resumed run: their tables, and run.json
    with 1,000 groups formed and each probe's group), times the last ``timed`` probes' events: started,
    finished and the result recorded. Seconds per finished probe: (the two events, RecordingListener; the
    result, the probe's handler)."""
    import contextlib
    import io
    import os
    import tempfile
    from dataclasses import replace

    from actors.records import ProbeResult, ProbeTask
    from pipeline.run.config import RunConfig
    from pipeline.run.driver import RunContext, _probe_done
    from pipeline.run.preflight import Prepared
    from pipeline.run.recorder import Recorder
    from pipeline.run.recording import RecordingListener
    from pipeline.run.tables import LANCZOS_SCHEMA, write_json, write_table

    rng = random.Random(tasks)

    def result(pid: int) -> ProbeResult:
        alphas = [1.0 + rng.random() for _ in range(steps)]
        betas = [0.1 + 0.1 * rng.random() for _ in range(steps - 1)] + [0.0]
        return ProbeResult(probe_id=pid, alphas=alphas, betas=betas, stopped="steps", hvp_seconds=[0.01] * steps,
                           step_seconds=[0.01] * steps, checkpoint_seconds=[], resumed_at_step=0)

    with tempfile.TemporaryDirectory(prefix="hs-sim-") as out:
        config = RunConfig()
        config = replace(config, output_dir=out, lanczos=replace(config.lanczos, probes=tasks, steps=steps))
        done = tasks - timed
        cols = {"probe_id": [p for p in range(done) for _ in range(steps)], "step": list(range(steps)) * done,
                "alpha": [], "beta": []}
        for pid in range(done):
            r = result(pid)
            cols["alpha"] += r.alphas
            cols["beta"] += r.betas
        write_table(os.path.join(out, "lanczos.parquet"), cols, schema=LANCZOS_SCHEMA, config_json=config.to_json())
        groups = [{"group": g, "event": "formed", "at_seconds": 1.0, "nodes": [f"node{g:05d}"]} for g in range(1000)]
        write_json(os.path.join(out, "run.json"), {"config": config.to_dict(), "groups": groups,
                                                   "probe_groups": {str(p): p % 1000 for p in range(done)}})
        recorder = Recorder(Prepared(config=config, model_path=None, batches=None))
        listener = RecordingListener(recorder)
        run = RunContext(prepared=None, recorder=recorder, scheduler=None)
        results = [(ProbeTask(probe_id=p, seed=0, eps=1e-3, scheme="central", steps=steps, reorth="full", window=4,
                              vector_dtype="float32", checkpoint_dir=None, checkpoint_every=0), result(p))
                   for p in range(done, tasks)]
        events = handled = 0.0
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # log lines
            for k, (task, res) in enumerate(results):
                started = clock()
                listener.task_started(k % 1000, task)
                listener.task_finished(k % 1000, task, res)
                between = clock()
                _probe_done(run, task, res, k % 1000)
                events, handled = events + between - started, handled + clock() - between
        return events / timed, handled / timed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="1000,10000,100000")
    parser.add_argument("--groups", default="", help="groups per row (default: tasks/100, and 1000 for every row)")
    parser.add_argument("--timed", type=int, default=5, help="probes timed through the real Recorder per row")
    parser.add_argument("--repeats", type=int, default=3, help="simulations per row (the fastest is reported)")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.tasks.split(",")]
    layouts = ([(int(g), n) for g, n in zip(args.groups.split(","), counts)] if args.groups
               else [(max(1, n // 100), n) for n in counts] + [(1000, n) for n in counts])
    print(f"{'groups':>7}{'tasks':>8}{'polls':>7}{'lost':>6}{'requeued':>9}{'driver us/task':>15}"
          f"{'sim s':>7}{'record ms/task':>15}{'events':>9}{'result':>9}", flush=True)
    recording = {}
    for groups, n in layouts:
        sim = min((simulate(groups=groups, tasks=n) for _ in range(args.repeats)), key=lambda s: s.driver_seconds)
        assert len(sim.tally.finished) == n and set(sim.tally.finished.values()) == {1} and not sim.tally.wrong
        if n not in recording:
            recording[n] = recording_seconds_per_task(n, timed=min(args.timed, n))
        print(f"{groups:>7}{n:>8}{sim.backend.polls:>7}{sim.tally.lost:>6}{sim.tally.requeued:>9}"
              f"{1e6 * sim.driver_seconds / n:>15.1f}{sim.seconds:>7.2f}{1e3 * sum(recording[n]):>15.2f}"
              f"{1e3 * recording[n][0]:>9.2f}{1e3 * recording[n][1]:>9.2f}", flush=True)


if __name__ == "__main__":
    main()
