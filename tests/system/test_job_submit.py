"""The CLI as a `ray job submit` entrypoint against a local `ray start --head` (cluster.address: auto), and a
default run (cluster.address: null) beside that cluster, on its own private Ray, leaving the cluster untouched.

The head is this test's own: pinned to 127.0.0.1, its own --temp-dir and ports (other Rays on the machine, a
developer's or another test's, keep theirs), and it is stopped by the PIDs of its processes, never `ray stop`,
which would kill every Ray on the machine."""

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request

import pytest

from actors.worker import free_port
from pipeline.cli import main
from pipeline_fixtures import assets, write_config
from proc_tools import alive, descendants, kill_all

pytestmark = pytest.mark.slow  # Ray, subprocess runs or simulated clusters: outside `-m "not slow"`

PORT_FLAGS = ("--port", "--dashboard-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
              "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port", "--object-manager-port",
              "--ray-client-server-port")


def _processes_of(temp_dir: str) -> set[int]:
    """Every process whose command line names this head's temp dir (GCS, raylet, agents, workers), and theirs."""
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            if temp_dir in _cmdline(int(name)):
                found.add(int(name))
    return set().union(*(descendants(pid) for pid in found)) if found else set()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} did not answer within {seconds:g} s")
        time.sleep(0.5)


def test_ray_job_submit_runs_the_cli_and_a_default_run_stays_private(tmp_path):
    model, data = assets(str(tmp_path))
    config = write_config(str(tmp_path / "c.yaml"), model=model, data=data, output_dir=str(tmp_path / "out"),
                          cluster={"address": "auto"}, lanczos={"steps": 5})
    ports = {flag: free_port() for flag in PORT_FLAGS}
    temp_dir = f"/tmp/hs-job-{os.getpid()}-{ports['--port']}"  # short: Ray's socket paths have a length limit
    # Ray >= 2.5x enables dashboard token auth unless told otherwise; this head is local to the test
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "disabled"}
    dashboard = ports["--dashboard-port"]
    started = subprocess.run(["ray", "start", "--head", "--node-ip-address=127.0.0.1", f"--temp-dir={temp_dir}",
                              "--num-cpus=2", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
                              "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())],
                             env=env, capture_output=True, text=True, timeout=120)
    head = _processes_of(temp_dir)
    try:
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-2000:]
        # the job agent answers only once the raylet registered it; a submit before that finds "no agent"
        _wait_http(f"http://127.0.0.1:{ports['--dashboard-agent-listen-port']}/api/local_raylet_healthz", 90)
        _wait_http(f"http://127.0.0.1:{dashboard}/api/gcs_healthz", 90)
        job = subprocess.run(["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
                              "hessian-spectrum", "run", config], env=env, capture_output=True, text=True,
                             timeout=300)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
        info = json.load(open(tmp_path / "out" / "run.json"))
        assert info["status"] == "complete" and info["timing"]["hvp_count"] >= 10

        # a default run beside this head: its own private Ray, and the head is untouched
        head = _processes_of(temp_dir)
        core = {pid for pid in head if any(name in _cmdline(pid) for name in ("gcs_server", "raylet"))}
        assert len(core) >= 2, core
        private = write_config(str(tmp_path / "p.yaml"), model=model, data=data, output_dir=str(tmp_path / "private"),
                               lanczos={"steps": 5, "probes": 1})
        assert main(["run", private]) == 0
        assert json.load(open(tmp_path / "private" / "run.json"))["status"] == "complete"
        assert alive(core) == core, f"the other cluster lost processes: {core - alive(core)}"
        jobs = subprocess.run(["ray", "job", "list", "--address", f"http://127.0.0.1:{dashboard}"], env=env,
                              capture_output=True, text=True, timeout=120)
        assert jobs.returncode == 0 and jobs.stdout.count("job_id=") == 1, jobs.stdout[-2000:]
    finally:
        ours = head | _processes_of(temp_dir)
        for pid in ours:
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 10
        while alive(ours) and time.monotonic() < deadline:
            time.sleep(0.2)
        kill_all(alive(ours))
        shutil.rmtree(temp_dir, ignore_errors=True)
