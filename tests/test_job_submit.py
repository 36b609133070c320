"""The CLI as a `ray job submit` entrypoint against a local `ray start --head` (cluster.address: auto)."""

import json
import os
import subprocess

from actors.worker import free_port
from pipeline_fixtures import assets, write_config


def test_ray_job_submit_runs_the_cli(tmp_path):
    model, data = assets(str(tmp_path))
    config = write_config(str(tmp_path / "c.yaml"), model=model, data=data, output_dir=str(tmp_path / "out"),
                          cluster={"address": "auto"}, lanczos={"steps": 5})
    gcs, dashboard = free_port(), free_port()
    # Ray >= 2.5x enables dashboard token auth unless told otherwise; this head is local to the test
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    subprocess.run(["ray", "start", "--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dashboard}", "--include-dashboard=true", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        job = subprocess.run(["ray", "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--",
                              "hessian-spectrum", "run", config], env=env, capture_output=True, text=True,
                             timeout=300)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout + job.stderr
    finally:
        subprocess.run(["ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
    info = json.load(open(tmp_path / "out" / "run.json"))
    assert info["status"] == "complete" and info["timing"]["hvp_count"] >= 10
