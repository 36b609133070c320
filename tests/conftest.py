"""Shared fixtures: tiny trained HF causal LMs with dense float64 Hessians, a module's private Ray, and a guard that
fails a test whose command starts Ray before checking its input. The helpers they use live in ``helpers.py``."""

from __future__ import annotations

import os
import sys

import pytest

from helpers import ARCHS, dense_hessian, make_batches, make_tiny_model

# some test modules take dense references from others by module name (``from test_masked_loss import ...``), which
# pytest's import mode finds only once the other module's folder is on sys.path, i.e. in a whole-suite run: put
# every test folder there (last, so that no test folder stands in for a package), so that any file runs alone too
_TESTS = os.path.dirname(os.path.abspath(__file__))
for _folder, _, _files in sorted(os.walk(_TESTS)):
    if _folder != _TESTS and any(f.startswith("test_") and f.endswith(".py") for f in _files) \
            and _folder not in sys.path:
        sys.path.append(_folder)


@pytest.fixture(scope="session", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_f64(arch):
    """(arch, trained float64 model, batches, dense Hessian)."""
    model = make_tiny_model(arch)
    batches = make_batches(num_batches=2, batch_size=2, seed=7)
    return arch, model, batches, dense_hessian(model, batches)


@pytest.fixture(scope="module")
def shared_ray():
    """One private local Ray for a module's in-process runs, which use the Ray this process is connected to
    and leave it running (``connect_ray``): a Ray start and stop per module instead of per run. Modules whose
    tests are about a run's own Ray (its start, sockets, shutdown, signals) or that join a simulated cluster
    do not use it."""
    import ray

    from pipeline.run.config import RunConfig
    from pipeline.run.ray_connection import connect_ray

    assert not ray.is_initialized(), "another module left Ray connected"
    connect_ray(RunConfig(), need_cpus=8)  # room for the largest layout a test asks for (logical CPUs)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def shared_ray_address(shared_ray, monkeypatch) -> str:
    """The module's Ray, for a test's subprocess run to join (``cluster.address``) when the run's own local Ray is
    not what the test is about: a Ray start is about 5.5 CPU-seconds on the 2-core machine the suite is sized for.
    Such a run's actors end with its driver, as any Ray job's do. The subprocess takes 127.0.0.1 as its node's
    address, where the module's Ray listens (Ray would otherwise look for its raylet on the machine's interface
    address, and wait there forever)."""
    import ray

    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return ray.get_runtime_context().gcs_address


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the command under test starts Ray or connects to one: input checks come first. Both
    are patched, as a process already connected (``shared_ray``) would not call ``ray.init`` at all."""
    import ray

    import pipeline.run.driver as driver
    import pipeline.run.ray_connection as ray_connection

    def used(*args, **kwargs):
        pytest.fail("Ray used before the input was checked")

    monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("Ray started before the input was checked"))
    monkeypatch.setattr(ray_connection, "connect_ray", used)
    monkeypatch.setattr(driver, "connect_ray", used)  # imported by name there


def pytest_collection_modifyitems(config, items):
    """Modules with slow tests first, each module kept whole (its module fixtures are built once): with
    ``-n 2`` the long tests start early and the short ones fill in at the end, so both workers finish close
    together instead of one waiting on a long test that started last."""
    modules = {}
    for item in items:
        modules.setdefault(item.module.__name__, []).append(item)
    slow = {name for name, its in modules.items() if any(it.get_closest_marker("slow") for it in its)}
    items[:] = [it for name, its in sorted(modules.items(), key=lambda kv: kv[0] not in slow) for it in its]


def pytest_configure(config):
    """One torch thread in each pytest process: the models are tiny (threads only add synchronisation), and
    with ``-n 2`` two processes of two threads each would share the 2 cores that the suite is sized for."""
    import torch

    torch.set_num_threads(1)
