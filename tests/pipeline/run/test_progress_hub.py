"""Runs on one Ray connection share one progress queue: each run's drain returns its own events (in any order:
the queue is an async actor, and fire-and-forget puts may run out of order), and a released run's late events are
dropped."""

import time

import pytest

from actors.results import ProgressEvent
from pipeline.run.ray_groups import ProgressHub

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray")]  # the queue is a Ray actor


def _drain_until(token: int, count: int) -> list[ProgressEvent]:
    events, deadline = [], time.monotonic() + 30
    while len(events) < count and time.monotonic() < deadline:  # puts are fire-and-forget
        events += ProgressHub.drain(token)
        time.sleep(0.05)
    return events


def test_each_run_drains_its_own_events_and_a_released_run_none():
    first, second = ProgressHub.register(), ProgressHub.register()
    sink_a, sink_b = ProgressHub.sink(first), ProgressHub.sink(second)
    for step in range(1, 4):
        sink_a(ProgressEvent(probe_id=0, step=step, steps=3, hvp_seconds=0.1))
        sink_b(ProgressEvent(probe_id=7, step=step, steps=3, hvp_seconds=0.2))
    got_b = _drain_until(second, 3)  # draining b first files a's events under a
    got_a = _drain_until(first, 3)
    assert sorted((e.probe_id, e.step) for e in got_a) == [(0, 1), (0, 2), (0, 3)]
    assert sorted((e.probe_id, e.step) for e in got_b) == [(7, 1), (7, 2), (7, 3)]

    ProgressHub.unregister(first)
    sink_a(ProgressEvent(probe_id=0, step=4, steps=4, hvp_seconds=0.1))  # a late event of a finished run
    sink_b(ProgressEvent(probe_id=7, step=4, steps=4, hvp_seconds=0.2))
    assert [(e.probe_id, e.step) for e in _drain_until(second, 1)] == [(7, 4)]
    assert ProgressHub.drain(first) == [] and first not in ProgressHub._pending
    ProgressHub.unregister(second)
