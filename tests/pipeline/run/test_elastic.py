"""Elastic runs on a simulated cluster (ray.cluster_utils.Cluster, every node on 127.0.0.1): a node joining
mid-run, a node removed mid-probe, no group for too long, and checkpoints moving between group sizes."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray

from actors.worker import free_port
from hessian_core import latest_complete_step
from pipeline.cli import main
from pipeline.run.config import RunConfig
from pipeline.run.ray_connection import connect_ray
from pipeline_fixtures import assets, write_config
from proc_tools import alive, kill_all

# one worker runs the whole module: the uninterrupted references are built once, and two simulated clusters
# never compete for the cores
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("elastic")]
SLOT = "hs_test_group"  # a custom resource: each simulated node hosts one group of one worker


@pytest.fixture(scope="module", autouse=True)
def _no_ray_left():
    yield
    ray.shutdown()  # the local Ray of the references and the cross-size runs, when a cross-size test ran last


@pytest.fixture
def local_ray(references, monkeypatch) -> str:
    """The references' local Ray (started again after a simulated cluster stopped it), for a cross-size run's
    killed driver to join and its resume to use: two Ray starts saved a test. Its subprocess takes 127.0.0.1 as
    its node address, where this Ray listens."""
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if not ray.is_initialized():
        connect_ray(RunConfig(), need_cpus=4)
    return ray.get_runtime_context().gcs_address


@pytest.fixture
def cluster(monkeypatch):
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    ray.shutdown()  # a simulated cluster's runs connect to it, never to the cross-size tests' local Ray

    # every process of the simulated cluster (and the runs joining it) takes 127.0.0.1 as its node address:
    # Ray otherwise rewrites a 127.0.0.1 address to the machine's interface address, where nothing listens
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1",
                                                      "dashboard_agent_listen_port": free_port()})
    try:
        yield c
    finally:
        c.shutdown()


def add_group_node(cluster):
    # each node's agent on its own port: on Ray's fixed default every node after the first waits ~3.5 s for it
    return cluster.add_node(num_cpus=1, resources={SLOT: 1}, node_ip_address="127.0.0.1",
                            dashboard_agent_listen_port=free_port())


def elastic_config(tmp_path, cluster, name: str, *, probes: int, steps: int, **cluster_keys) -> str:
    model, data = assets(str(tmp_path / f"assets-{name}"))
    return write_config(str(tmp_path / f"{name}.yaml"), model=model, data=data, output_dir=str(tmp_path / name),
                        cluster={"address": cluster.address, "cpus_per_worker": 1, "worker_resources": {SLOT: 1},
                                 "collective_timeout_seconds": 30, **cluster_keys},
                        lanczos={"steps": steps, "probes": probes, "reorth": "window", "window": 4},
                        checkpoint={"every": 1})


def start(config: str, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", config, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def run_json(out) -> dict:
    try:
        return json.loads((out / "run.json").read_text())
    except (OSError, ValueError):
        return {}


def wait_for(predicate, *, timeout: float = 180, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def formed(info: dict) -> list[dict]:
    return [g for g in info.get("groups", []) if g["event"] == "formed"]


def tables(out) -> tuple[np.ndarray, np.ndarray]:
    df = pq.read_table(out / "lanczos.parquet").to_pandas().sort_values(["probe_id", "step"])
    return df.alpha.to_numpy(), df.beta.to_numpy()


ELASTIC_PROBES, ELASTIC_STEPS = 4, 48  # steps: margin between a check and the pause that follows it (>= 0.4 s)


def group_pids(out, group: int) -> list[int]:
    return next(g["pids"] for g in formed(run_json(out)) if g["group"] == group)


def probe_step(out, group: int) -> int:
    """The newest checkpointed step of the probe that ``group`` is running (0 when it runs none)."""
    task = run_json(out).get("running", {}).get(str(group), "")
    if not task.startswith("probe "):
        return 0
    found = latest_complete_step(str(out / "checkpoints" / f"probe-{int(task.split()[1]):05d}"))
    return found[0] if found is not None else 0


@contextlib.contextmanager
def paused(pids: list[int]):
    """The test's hold on a run: a group's workers stopped (SIGSTOP) until the test has made its change, so a
    short run cannot finish before a node joins or leaves."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _kill_mid_probe(config: str, out) -> int:
    """Start a run and SIGKILL it (the driver's process group, and the workers)
    while probe 0 is past step 8 and not finished: its workers are stopped first, so the run cannot end
    between the check and the kill."""
    proc = start(config)
    stopped: list[int] = []
    try:
        wait_for(lambda: probe_step(out, 0) >= 8, what="a checkpoint at step 8")
        stopped = group_pids(out, 0)
        with paused(stopped):
            at = latest_complete_step(str(out / "checkpoints" / "probe-00000"))[0]
            os.killpg(proc.pid, signal.SIGKILL)
            # the workers too: stopped, they could not take part in their job's end
            kill_all(set(stopped))
    finally:
        with contextlib.suppress(ProcessLookupError):  # a check failed before the kill
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    wait_for(lambda: not alive(set(stopped)), timeout=30, what="the stopped workers to go")
    assert at < CROSS_SIZE_STEPS
    return at


CROSS_SIZE_STEPS = 60


def _cross_size_config(path, *, model: str, data: str, output_dir: str, workers: int, address: str | None = None) -> str:
    # full reorthogonalization: a windowed run amplifies reduction-order differences over 60 steps
    return write_config(str(path), model=model, data=data, output_dir=str(output_dir),
                        lanczos={"steps": CROSS_SIZE_STEPS, "probes": 1, "reorth": "full"}, checkpoint={"every": 1},
                        cluster={"num_workers": workers, "cpus_per_worker": 1, "address": address})


@dataclasses.dataclass(frozen=True, kw_only=True)
class References:
    static: tuple[np.ndarray, np.ndarray]  # the elastic runs' probes on one group, never interrupted
    model: str
    data: str
    by_workers: dict[int, tuple[np.ndarray, np.ndarray]]  # one probe on 1 and on 2 ranks, uninterrupted


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> References:
    """Uninterrupted runs, all on one local Ray (kept for the cross-size tests, stopped before a simulated cluster
    starts): the elastic runs' reference and both directions of a checkpoint's move between group sizes."""
    root = tmp_path_factory.mktemp("references")
    model, data = assets(str(root))
    if not ray.is_initialized():
        connect_ray(RunConfig(), need_cpus=4)
    try:
        static = write_config(str(root / "static.yaml"), model=model, data=data, output_dir=str(root / "static"),
                              lanczos={"steps": ELASTIC_STEPS, "probes": ELASTIC_PROBES, "reorth": "window",
                                       "window": 4}, checkpoint={"every": 1},
                              cluster={"cpus_per_worker": 1})  # as many torch threads as the elastic runs' workers
        assert main(["run", static]) == 0
        by_workers = {}
        for workers in (1, 2):
            ref = _cross_size_config(root / f"w{workers}.yaml", model=model, data=data,
                                     output_dir=root / f"w{workers}", workers=workers)
            assert main(["run", ref]) == 0
            by_workers[workers] = tables(root / f"w{workers}")
    except BaseException:
        ray.shutdown()
        raise
    return References(static=tables(root / "static"), model=model, data=data, by_workers=by_workers)


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_checkpoint_moves_between_group_sizes(tmp_path, before, after, references, local_ray):
    config = _cross_size_config(tmp_path / "moved.yaml", model=references.model, data=references.data,
                                output_dir=tmp_path / "moved", workers=before, address=local_ray)
    at = _kill_mid_probe(config, tmp_path / "moved")
    assert main(["run", config, "--set", f"cluster.num_workers={after}"]) == 0
    info = run_json(tmp_path / "moved")
    assert info["status"] == "complete" and info["resumed_from"]["checkpoint_steps"]["0"] >= at
    moved = tables(tmp_path / "moved")

    first, second = references.by_workers[before], references.by_workers[after]
    k = info["resumed_from"]["checkpoint_steps"]["0"]
    for m, b, a in zip(moved, first, second):
        assert np.array_equal(m[:k], b[:k])  # the checkpointed steps, as the first group computed them
        # the rest: the other group's arithmetic (reduction order) from the same vectors, as close to an
        # uninterrupted run on either size as those two runs are to each other (the layouts test's measure)
        for reference in (a, b):
            assert np.linalg.norm(m - reference) / np.linalg.norm(reference) <= 1e-9


# the simulated clusters last: the cross-size tests above share the references' local Ray, which the first
# cluster stops
def test_a_node_joining_mid_run_forms_a_group_that_takes_probes(tmp_path, cluster, references):
    add_group_node(cluster)
    config = elastic_config(tmp_path, cluster, "elastic", probes=ELASTIC_PROBES, steps=ELASTIC_STEPS, num_groups=3,
                            min_groups=1)
    proc = start(config)
    out = tmp_path / "elastic"
    wait_for(lambda: probe_step(out, 0) >= 2, what="group 0 past step 2 of a probe")
    with paused(group_pids(out, 0)):  # group 0 holds its probe until the new group has taken one
        add_group_node(cluster)  # the pending placement groups find room on it
        wait_for(lambda: any(task.startswith("probe ") for group, task in run_json(out).get("running", {}).items()
                             if group != "0"), what="a new group running a probe")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    info = run_json(out)
    assert info["status"] == "complete"
    assert len({g["group"] for g in formed(info)}) == 2, info["groups"]
    assert len({p for p in info["probe_groups"].values()}) == 2, info["probe_groups"]  # both took probes
    assert "group 1 formed" in output or "group 2 formed" in output
    for a, b in zip(tables(out), references.static):
        assert np.array_equal(a, b)


def test_a_node_removed_mid_probe_moves_the_probe_to_a_survivor(tmp_path, cluster, references):
    nodes = [add_group_node(cluster), add_group_node(cluster)]
    config = elastic_config(tmp_path, cluster, "removed", probes=ELASTIC_PROBES, steps=ELASTIC_STEPS, num_groups=2,
                            min_groups=1, max_failures=0)
    proc = start(config)
    out = tmp_path / "removed"
    wait_for(lambda: probe_step(out, 1) >= 2, what="group 1 past step 2 of a probe")
    node_of_group_one = next(g["nodes"][0] for g in formed(run_json(out)) if g["group"] == 1)
    with paused(group_pids(out, 1)):  # still mid-probe when its node goes
        assert 0 < probe_step(out, 1) < ELASTIC_STEPS
        cluster.remove_node(next(n for n in nodes if n.node_id == node_of_group_one), allow_graceful=False)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    info = run_json(out)
    assert info["status"] == "complete" and info["worker_failures_recovered"] == 0
    assert info["probes_moved"] >= 1 and any(g["event"] == "lost" for g in info["groups"])
    assert "was lost" in output
    for a, b in zip(tables(out), references.static):
        assert np.array_equal(a, b)


def test_no_group_for_too_long_fails_keeping_checkpoints_and_the_same_command_resumes(tmp_path, cluster):
    node = add_group_node(cluster)
    steps = ELASTIC_STEPS
    config = elastic_config(tmp_path, cluster, "starved", probes=1, steps=steps, placement_timeout_seconds=4)
    proc = start(config)
    out = tmp_path / "starved"
    probe = str(out / "checkpoints" / "probe-00000")
    wait_for(lambda: probe_step(out, 0) >= 5, what="a checkpoint at step 5")
    with paused(group_pids(out, 0)):
        cluster.remove_node(node, allow_graceful=False)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output[-3000:]
    last = [line for line in output.splitlines() if line.startswith("hessian-spectrum: failed")]
    assert last and "cluster.min_groups=1" in last[0] and "resume" in last[0], output[-3000:]
    info = run_json(out)
    assert info["status"] == "failed" and "PlacementTimeout" in info["error"]
    kept = latest_complete_step(probe)
    assert kept is not None and 5 <= kept[0] < steps

    add_group_node(cluster)
    assert main(["run", config]) == 0
    info = run_json(out)
    assert info["status"] == "complete" and info["resumed"]
    assert info["timing"]["hvp_count"] <= steps - kept[0]
