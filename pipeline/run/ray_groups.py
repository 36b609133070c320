"""The scheduler's groups on Ray (``pipeline.run.scheduler.GroupBackend``): WorkerGroups of the run's layout, Ray's
waits, its exception types told apart into losses and task errors, and the progress queue on the driver's node."""

from __future__ import annotations

import itertools
import threading
import time
from typing import Any

import torch

from actors.group import WorkerGroup
from actors.records import ProgressEvent

from .preflight import Prepared, model_spec


def is_loss(err: BaseException) -> bool:
    """A node or actor lost (not an error of the task itself), from Ray's exception types: the actor died or
    is unreachable, its node or worker process died, or a collective failed because a peer did."""
    import ray.exceptions as rex

    lost = (rex.RayActorError, rex.NodeDiedError, rex.WorkerCrashedError, rex.LocalRayletDiedError,
            rex.ObjectLostError, rex.OwnerDiedError)
    if isinstance(err, lost):
        return True
    return isinstance(err, rex.RayTaskError) and isinstance(err.cause, torch.distributed.DistError)


class ProgressHub:
    """One progress queue per Ray connection, shared by every run this process makes on it (a sweep's points, an
    API user's repeated calls, a test module's runs). A queue is an actor, and so a worker process: one per run
    cost a process start each (55 of the suite's 136 worker processes). Events go in tagged with their run's
    token; a drain takes everything pending and hands each run its own."""

    _lock = threading.Lock()
    _queue = None
    _session: str | None = None
    _pending: dict[int, list[ProgressEvent]] = {}
    _tokens = itertools.count()

    @classmethod
    def register(cls) -> int:
        with cls._lock:
            cls._queue_for_this_session()
            token = next(cls._tokens)
            cls._pending[token] = []
            return token

    @classmethod
    def unregister(cls, token: int) -> None:
        with cls._lock:
            cls._pending.pop(token, None)

    @classmethod
    def sink(cls, token: int):
        with cls._lock:
            actor = cls._queue_for_this_session().actor

        def progress(event: ProgressEvent) -> None:
            # fire and forget: a blocking put would hold rank 0 (and so its group) for a round trip every step
            actor.put_nowait.remote((token, event))

        return progress

    @classmethod
    def drain(cls, token: int) -> list[ProgressEvent]:
        with cls._lock:
            queue = cls._queue_for_this_session()
            pending = queue.qsize()
            for owner, event in queue.get_nowait_batch(pending) if pending else []:  # two round trips, not one a step
                if owner in cls._pending:  # a finished run's late events are dropped
                    cls._pending[owner].append(event)
            events = cls._pending.get(token)
            if events is None:  # released: nothing to hand out, and nothing kept for it
                return []
            cls._pending[token] = []
            return events

    @classmethod
    def _queue_for_this_session(cls):
        """The queue of the Ray this process is connected to now: a new connection (Ray shut down and started
        again) gets a new queue, on the driver's node (a worker node may be removed, and the queue with it)."""
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        context = ray.get_runtime_context()
        session = f"{context.gcs_address}/{context.get_node_id()}/{context.get_job_id()}"
        if cls._queue is None or cls._session != session:
            here = NodeAffinitySchedulingStrategy(node_id=context.get_node_id(), soft=False)
            cls._queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
            cls._session = session
        return cls._queue


class GroupPool:
    """Formed groups that finished a run idle, kept for the next run of the same shape (a sweep's points): that
    run's ranks load its model in processes that have imported everything and formed their process group, which
    saves each rank's start (seconds of imports) and the rendezvous. A kept group holds its placement group (its
    cluster resources) until a run takes it or ``close`` kills it; the sweep that made the pool closes it.

    Thread-safe: a sweep's concurrent points park and take groups from their own threads."""

    _session_lock = threading.Lock()
    _session: tuple[tuple[str, str], GroupPool] | None = None

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: list[WorkerGroup] = []
        self.reused = 0  # groups taken back out, for the sweep's log

    @classmethod
    def for_this_session(cls) -> GroupPool:
        """This process's pool on the Ray it is connected to now (``cluster.keep_groups``). A pool of an earlier
        connection is dropped: its groups' actors ended with that connection (they are owned by this driver)."""
        import ray

        context = ray.get_runtime_context()
        job = (context.get_job_id(), context.get_node_id())  # job ids restart at 1 in a new Ray; node ids do not
        with cls._session_lock:
            if cls._session is None or cls._session[0] != job:
                cls._session = (job, cls())
            return cls._session[1]

    def take(self, shape: tuple, index: int) -> WorkerGroup | None:
        """An idle group of ``shape``, renumbered ``index``; where none is kept, the kept groups of other shapes
        are shut down first, so that the placement group requested instead finds their resources free."""
        with self._lock:
            for i, group in enumerate(self._idle):
                if group.shape == shape:
                    del self._idle[i]
                    group.index = index
                    self.reused += 1
                    return group
            other, self._idle = self._idle, []
        _shut_down(other)
        return None

    def park(self, group: WorkerGroup) -> None:
        with self._lock:
            self._idle.append(group)

    def close(self) -> None:
        """Shut every kept group down (their process groups destroyed, the actors and placement groups gone)."""
        with self._lock:
            idle, self._idle = self._idle, []
        _shut_down(idle)


def _shut_down(groups: list[WorkerGroup]) -> None:
    for group in groups:
        try:
            group.shutdown(graceful=True)
        except Exception:  # noqa: BLE001 - best effort at teardown: a kept group's node may be gone
            pass


class RayGroups:
    """Groups of ``cluster.num_workers`` ranks holding the prepared run's model, each fed ``batches_ref``.
    ``own_ray=False`` (a sweep's point): a Ray that the sweep shut down stops the run. With a ``pool``, a group
    is taken from it before a new one is requested, and an idle formed group goes back to it when the run ends."""

    def __init__(self, prepared: Prepared, *, batches_ref: Any, own_ray: bool = True, pool: GroupPool | None = None):
        self.prepared, self.batches_ref, self.own_ray, self.pool = prepared, batches_ref, own_ray, pool
        self.cluster = prepared.config.cluster
        self.progress_token = ProgressHub.register()

    def _shape(self) -> tuple:
        return (self.cluster.num_workers, self.cluster.use_gpu, self.prepared.worker_cpus(),
                tuple(sorted((self.cluster.worker_resources or {}).items())), self.cluster.collective_timeout_seconds)

    def request(self, index: int) -> WorkerGroup:
        kept = self.pool.take(self._shape(), index) if self.pool is not None else None
        if kept is not None:
            return kept
        return WorkerGroup(index=index, num_workers=self.cluster.num_workers, use_gpu=self.cluster.use_gpu,
                           cpus_per_worker=self.prepared.worker_cpus(), resources=self.cluster.worker_resources)

    def release(self, group: WorkerGroup, *, graceful: bool, idle: bool) -> None:
        if self.pool is not None and idle and graceful:
            self.pool.park(group)
        else:
            group.shutdown(graceful=graceful)

    def start(self, group: WorkerGroup) -> list:
        return group.start(spec=model_spec(self.prepared), batches_ref=self.batches_ref,
                           timeout_seconds=self.cluster.collective_timeout_seconds)

    merge_infos = staticmethod(WorkerGroup.merge_infos)
    is_loss = staticmethod(is_loss)

    def wait(self, handles: list, *, num_returns: int, timeout: float) -> tuple[list, list]:
        import ray

        if not handles:
            time.sleep(timeout)
            return [], []
        return ray.wait(handles, num_returns=num_returns, timeout=timeout)

    def get(self, handle) -> Any:
        import ray

        return ray.get(handle)

    def progress_sink(self):
        return ProgressHub.sink(self.progress_token)

    def drain_progress(self) -> list[ProgressEvent]:
        return ProgressHub.drain(self.progress_token)

    def close(self) -> None:
        ProgressHub.unregister(self.progress_token)

    def check(self) -> None:
        import ray

        if not self.own_ray and not ray.is_initialized():
            raise RuntimeError("Ray was shut down by the sweep running this run")

    def available(self) -> bool:
        import ray

        return ray.is_initialized()


__all__ = ["GroupPool", "ProgressHub", "RayGroups", "is_loss"]
