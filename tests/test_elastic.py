"""Elastic runs on a simulated cluster (ray.cluster_utils.Cluster, every node on 127.0.0.1): a node joining
mid-run, a node removed mid-probe, no group for too long, and checkpoints moving between group sizes."""

from __future__ import annotations

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
import yaml

from hessian_core import latest_complete_step
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.ray_connection import connect_ray
from pipeline_fixtures import assets, write_config, write_input_ids

# one worker runs the whole module: the uninterrupted references are built once, and two simulated clusters
# never compete for the cores
pytestmark = pytest.mark.xdist_group("elastic")
SLOT = "hs_test_group"  # a custom resource: each simulated node hosts one group of one worker


@pytest.fixture
def cluster(monkeypatch):
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    # every process of the simulated cluster (and the runs joining it) takes 127.0.0.1 as its node address:
    # Ray otherwise rewrites a 127.0.0.1 address to the machine's interface address, where nothing listens
    monkeypatch.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1"})
    try:
        yield c
    finally:
        c.shutdown()


def add_group_node(cluster):
    return cluster.add_node(num_cpus=1, resources={SLOT: 1}, node_ip_address="127.0.0.1")


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


def test_a_node_joining_mid_run_forms_a_group_that_takes_probes(tmp_path, cluster):
    add_group_node(cluster)
    config = elastic_config(tmp_path, cluster, "elastic", probes=6, steps=200, num_groups=3, min_groups=1)
    proc = start(config)
    out = tmp_path / "elastic"
    wait_for(lambda: formed(run_json(out)), what="the first group")
    add_group_node(cluster)  # the pending placement groups find room on it
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    info = run_json(out)
    assert info["status"] == "complete"
    assert len({g["group"] for g in formed(info)}) == 2, info["groups"]
    assert len({p for p in info["probe_groups"].values()}) == 2, info["probe_groups"]  # both took probes
    assert "group 1 formed" in output or "group 2 formed" in output

    static = elastic_config(tmp_path, cluster, "static", probes=6, steps=200, num_groups=1)
    assert main(["run", static]) == 0
    for a, b in zip(tables(out), tables(tmp_path / "static")):
        assert np.array_equal(a, b)


def test_a_node_removed_mid_probe_moves_the_probe_to_a_survivor(tmp_path, cluster):
    nodes = [add_group_node(cluster), add_group_node(cluster)]
    config = elastic_config(tmp_path, cluster, "removed", probes=4, steps=200, num_groups=2, min_groups=1,
                            max_failures=0)
    proc = start(config)
    out = tmp_path / "removed"

    def group_one_mid_probe() -> bool:
        task = run_json(out).get("running", {}).get("1", "")
        if not task.startswith("probe "):
            return False
        found = latest_complete_step(str(out / "checkpoints" / f"probe-{int(task.split()[1]):05d}"))
        return found is not None and found[0] >= 5

    wait_for(group_one_mid_probe, what="group 1 past step 5 of a probe")
    node_of_group_one = next(g["nodes"][0] for g in formed(run_json(out)) if g["group"] == 1)
    cluster.remove_node(next(n for n in nodes if n.node_id == node_of_group_one), allow_graceful=False)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    info = run_json(out)
    assert info["status"] == "complete" and info["worker_failures_recovered"] == 0
    assert info["probes_moved"] >= 1 and any(g["event"] == "lost" for g in info["groups"])
    assert "was lost" in output

    static = elastic_config(tmp_path, cluster, "static", probes=4, steps=200, num_groups=1)
    assert main(["run", static]) == 0
    for a, b in zip(tables(out), tables(tmp_path / "static")):
        assert np.array_equal(a, b)


def test_no_group_for_too_long_fails_keeping_checkpoints_and_the_same_command_resumes(tmp_path, cluster):
    node = add_group_node(cluster)
    config = elastic_config(tmp_path, cluster, "starved", probes=1, steps=300, placement_timeout_seconds=4)
    proc = start(config)
    out = tmp_path / "starved"
    probe = str(out / "checkpoints" / "probe-00000")
    wait_for(lambda: (latest_complete_step(probe) or (0,))[0] >= 5, what="a checkpoint at step 5")
    cluster.remove_node(node, allow_graceful=False)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1, output[-3000:]
    last = [line for line in output.splitlines() if line.startswith("hessian-spectrum: failed")]
    assert last and "cluster.min_groups=1" in last[0] and "resume" in last[0], output[-3000:]
    info = run_json(out)
    assert info["status"] == "failed" and "PlacementTimeout" in info["error"]
    kept = latest_complete_step(probe)
    assert kept is not None and kept[0] >= 5

    add_group_node(cluster)
    assert main(["run", config]) == 0
    info = run_json(out)
    assert info["status"] == "complete" and info["resumed"]
    assert info["timing"]["hvp_count"] <= 300 - kept[0]


def _kill_when_checkpointed(config: str, out, *extra: str) -> int:
    """Start a run, SIGKILL its whole process group (driver and its local Ray) once probe 0 has a checkpoint."""
    proc = start(config, *extra)
    probe = str(out / "checkpoints" / "probe-00000")
    wait_for(lambda: (latest_complete_step(probe) or (0,))[0] >= 8, what="a checkpoint at step 8")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    return latest_complete_step(probe)[0]


def more_batches(config: str) -> str:
    """8 batches of 4 sequences: HVPs slow enough for a run to be stopped mid-probe."""
    with open(config) as f:
        tree = yaml.safe_load(f)
    tree["data"]["num_batches"] = 8
    with open(config, "w") as f:
        yaml.safe_dump(tree, f)
    return config


def _cross_size_common(model: str, data: str, workers: int) -> dict:
    # full reorthogonalization: a windowed run amplifies reduction-order differences over 60 steps
    return dict(model=model, data=data, lanczos={"steps": 60, "probes": 1, "reorth": "full"},
                checkpoint={"every": 1}, cluster={"num_workers": workers, "cpus_per_worker": 1})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same run on 1 and on 2 ranks, uninterrupted: the references of both directions of a move."""
    root = tmp_path_factory.mktemp("cross-size")
    model, _ = assets(str(root))
    data = write_input_ids(str(root / "more.parquet"), sequences=32)
    refs = {}
    connect_ray(RunConfig(), need_cpus=4)  # both references on one local Ray, stopped before the other tests
    try:
        for workers in (1, 2):
            ref = more_batches(write_config(str(root / f"w{workers}.yaml"), output_dir=str(root / f"w{workers}"),
                                            **_cross_size_common(model, data, workers)))
            assert main(["run", ref]) == 0
            refs[workers] = tables(root / f"w{workers}")
    finally:
        ray.shutdown()
    return model, data, refs


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_checkpoint_moves_between_group_sizes(tmp_path, before, after, uninterrupted):
    model, data, refs = uninterrupted
    config = more_batches(write_config(str(tmp_path / "moved.yaml"), output_dir=str(tmp_path / "moved"),
                                       **_cross_size_common(model, data, before)))
    at = _kill_when_checkpointed(config, tmp_path / "moved")
    assert main(["run", config, "--set", f"cluster.num_workers={after}"]) == 0
    info = run_json(tmp_path / "moved")
    assert info["status"] == "complete" and info["resumed_from"]["checkpoint_steps"]["0"] >= at
    moved = tables(tmp_path / "moved")

    first, second = refs[before], refs[after]
    k = info["resumed_from"]["checkpoint_steps"]["0"]
    for m, b, a in zip(moved, first, second):
        assert np.array_equal(m[:k], b[:k])  # the checkpointed steps, as the first group computed them
        # the rest: the other group's arithmetic (reduction order) from the same vectors, as close to an
        # uninterrupted run on either size as those two runs are to each other (the layouts test's measure)
        for reference in (a, b):
            assert np.linalg.norm(m - reference) / np.linalg.norm(reference) <= 1e-9
