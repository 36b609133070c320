"""A worker SIGKILLed in the middle of a probe: the group is rebuilt and the run finishes with the same numbers."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline_fixtures import assets, write_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray")]
STEPS = 40  # 2-rank steps (gloo): the kill comes 0.7 s into probe 0, about step 8


def test_run_survives_a_worker_sigkill_mid_probe(tmp_path, shared_ray_address):
    model, data = assets(str(tmp_path))
    # both runs on the module's Ray: the killed run's driver joins it (cluster.address)
    common = dict(model=model, data=data, cluster={"num_workers": 2, "max_failures": 0, "cpus_per_worker": 1,
                                                   "collective_timeout_seconds": 30, "address": shared_ray_address},
                  lanczos={"steps": STEPS, "probes": 2, "reorth": "window", "window": 4})
    killed_cfg = write_config(str(tmp_path / "killed.yaml"), output_dir=str(tmp_path / "killed"), **common)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", killed_cfg], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run_json = tmp_path / "killed" / "run.json"
    deadline = time.monotonic() + 120
    victim = None
    while time.monotonic() < deadline and victim is None:
        time.sleep(0.2)
        try:
            info = json.loads(run_json.read_text())
        except (OSError, ValueError):
            continue
        formed = [g for g in info.get("groups", []) if g["event"] == "formed"]
        if (info.get("timing") or {}).get("grad_seconds") and formed:  # calibrated: probes are starting
            victim = formed[0]["pids"][1]
    assert victim is not None, "the run never reached its probes"
    time.sleep(0.7)
    os.kill(victim, signal.SIGKILL)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    info = json.loads(run_json.read_text())
    # a killed rank is a lost group, not an error: it costs nothing against max_failures
    assert info["status"] == "complete" and info["worker_failures_recovered"] == 0, output[-3000:]
    assert info["probes_moved"] == 1 and [g["event"] for g in info["groups"]].count("lost") == 1
    assert "was lost" in output and "resumed at step" in output  # continued from its checkpoint

    clean_cfg = write_config(str(tmp_path / "clean.yaml"), output_dir=str(tmp_path / "clean"), **common)
    assert main(["run", clean_cfg]) == 0
    killed = pq.read_table(tmp_path / "killed" / "lanczos.parquet").to_pandas()
    clean = pq.read_table(tmp_path / "clean" / "lanczos.parquet").to_pandas()
    assert len(killed) == len(clean) == 2 * STEPS
    for col in ("alpha", "beta"):
        assert np.array_equal(killed[col].to_numpy(), clean[col].to_numpy()), col
