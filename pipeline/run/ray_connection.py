"""Connecting to Ray: a private local Ray by default, or a running cluster; and one group for the commands that
are not SLQ runs (hvp-error, bench)."""

from __future__ import annotations

import contextlib
import os
import platform

import torch

from . import signals
from .config import ConfigError, RunConfig
from .preflight import Prepared, model_spec

LOOPBACK = "127.0.0.1"
CLUSTER_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray's servers bind to loopback only


def connect_ray(config: RunConfig, *, need_cpus: int | None = None) -> bool:
    """Connect this process to Ray; True when this call started or joined it (the caller shuts it down), False
    when the process was already connected (a notebook, a Ray job's script, a test session): that Ray is
    used as it is and left running, as Ray's own libraries do."""
    import ray

    address = config.cluster.address
    if ray.is_initialized():
        _check_connected(address)
        signals.install()
        return False
    if address is None and not os.environ.get("RAY_ADDRESS"):
        need = need_cpus or config.cluster.num_workers * config.cluster.num_groups * config.cpus_per_worker()
        # "local": always a new private Ray, never one that `ray start` (or a test cluster) left on this machine
        with _loopback_only(), _no_driver_signal_handlers(), _own_agent_port():
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False,
                     _node_ip_address=LOOPBACK, logging_level="ERROR", configure_logging=True)
        signals.install()  # ray.init replaced the SIGTERM handler
        return True
    try:
        with _no_driver_signal_handlers():
            ray.init(address=address or os.environ.get("RAY_ADDRESS"), logging_level="ERROR")
    except (ConnectionError, RuntimeError) as e:
        raise ConfigError(f"cluster.address {address!r}: cannot join a Ray cluster ({str(e).splitlines()[0]})") from None
    signals.install()
    return True


def stop_ray() -> None:
    """``ray.shutdown()`` in the calling thread, once the Ray objects this process no longer references are
    released. Garbage such as a lost group's errors (their tracebacks hold its object references) is otherwise
    collected whenever the garbage collector runs: if that falls inside ``ray.shutdown``, after the core
    worker is torn down and before Ray drops its handle to it, the release calls into the dead core worker and
    Ray ends the process (exit 1, "The core worker has already been shutdown")."""
    import gc

    import ray

    gc.collect()
    with signals.deferred():  # installs the handlers again: a Ray that restores SIGTERM's default action too
        ray.shutdown()


@contextlib.contextmanager
def _no_driver_signal_handlers():
    """A driver whose core worker installs no failure signal handlers: Ray's (absl) handler covers SIGTERM, and
    its shutdown sets SIGTERM back to the default action (die by the signal) rather than to this process's
    handler, which would turn a SIGTERM during or after ``ray.shutdown`` into a death without a record. Only
    this process is concerned (the workers read the environment variable, which is left alone); the driver
    loses the C++ stack dump on a crash of its own."""
    import ray._private.ray_constants as ray_constants

    saved = ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    try:
        yield
    finally:
        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = saved


@contextlib.contextmanager
def _own_agent_port():
    """A private Ray's dashboard agent on a free loopback port. ``ray.init`` has no argument for it and Ray's
    fixed default (52365) is held by any other Ray on the machine (a second run, a test beside another): the
    agent then retries for ~3.5 s before giving up its HTTP server, and the raylet waits for it, which made a
    start beside another Ray 7 s instead of 3-4 s."""
    from ray._private import parameter

    from actors.worker import free_port

    original = parameter.RayParams
    port = free_port(LOOPBACK)

    class RayParams(original):
        def __init__(self, *args, dashboard_agent_listen_port=None, **kwargs):
            super().__init__(*args, dashboard_agent_listen_port=dashboard_agent_listen_port or port, **kwargs)

    parameter.RayParams = RayParams
    try:
        yield
    finally:
        parameter.RayParams = original


def _check_connected(address: str | None) -> None:
    """An explicit cluster.address must be the Ray this process is already connected to."""
    import ray

    connected = ray.get_runtime_context().gcs_address
    if address not in (None, "auto", "local") and address != connected:
        raise ConfigError(f"cluster.address {address!r}: this process is already connected to the Ray at "
                          f"{connected}; set cluster.address to that, or null, or run in a new process")


@contextlib.contextmanager
def _loopback_only():
    """Every server of the local Ray (GCS, raylet, object manager, agents, each worker's gRPC) on 127.0.0.1:
    an unauthenticated Ray on a network interface runs code for anyone who reaches it. Ray binds to loopback when
    clusters are disabled (its macOS/Windows default), which the env var (read by the processes it starts) and
    the constant (read by this process) do; both are restored once the processes run, so a later join of a
    real cluster in this process advertises a routable address."""
    import ray._private.ray_constants as ray_constants

    saved_env, saved_flag = os.environ.get(CLUSTER_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[CLUSTER_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(CLUSTER_ENV, None)
        else:
            os.environ[CLUSTER_ENV] = saved_env


def versions() -> dict:
    import ray
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "ray": ray.__version__}


@contextlib.contextmanager
def one_group(prepared: Prepared):
    """A local or joined Ray with one group of the config's ``num_workers`` ranks holding the model; yields
    (group, its GroupInfo); tears both down."""
    import ray

    from actors.group import WorkerGroup, rank0

    config = prepared.config
    started = connect_ray(config)
    group = None
    try:
        group = WorkerGroup(index=0, num_workers=config.cluster.num_workers, use_gpu=config.cluster.use_gpu,
                            cpus_per_worker=prepared.worker_cpus(), resources=config.cluster.worker_resources)
        ready, _ = ray.wait([group.placed], timeout=config.cluster.placement_timeout_seconds)
        if not ready:
            raise RuntimeError(f"the cluster could not place a group of {config.cluster.num_workers} worker(s) with "
                               f"{group.bundle} each within cluster.placement_timeout_seconds="
                               f"{config.cluster.placement_timeout_seconds:g}")
        infos = ray.get(group.start(spec=model_spec(prepared), batches_ref=ray.put(prepared.batches),
                                    timeout_seconds=config.cluster.collective_timeout_seconds))
        yield group, WorkerGroup.merge_infos(infos)
    finally:
        if group is not None:
            group.shutdown()
        group = None
        if started:
            stop_ray()


__all__ = ["connect_ray", "one_group", "stop_ray", "versions"]
