"""`hessian-spectrum bench` and the GPU script, end to end on tiny models (figures are not asserted: they
belong in BENCHMARKS.md; what is asserted is that every measurement is there and sane)."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.cli import main
from pipeline_fixtures import assets, write_config

pytestmark = pytest.mark.slow  # Ray, subprocess runs or simulated clusters: outside `-m "not slow"`

KERNELS = {"gradient", "fd_hvp_central", "fd_hvp_richardson", "exact_hvp", "lanczos_vectors_none",
           "lanczos_vectors_window8", "lanczos_vectors_full16", "lanczos_step", "lanczos_step_checkpoint_every1"}


@pytest.mark.usefixtures("shared_ray")  # its runs on the module's Ray: three Ray starts saved (numbers are not checked)
def test_bench_measures_kernels_layouts_and_the_peer(tmp_path, capsys):
    model, data = assets(str(tmp_path))
    config = write_config(str(tmp_path / "b.yaml"), model=model, data=data, output_dir=str(tmp_path / "out"),
                          cluster={"num_workers": 2}, lanczos={"steps": 4, "probes": 1})
    assert main(["bench", config, "--repeats", "2", "--runs", "1", "--layouts", "1x1,1x2", "--eigen", "3",
                 "--set", "eigen.tol=1e-6"]) == 0
    result = json.load(open(tmp_path / "out" / "bench" / "bench.json"))
    kernels = {r["kernel"]: r for r in result["kernels"]}
    assert set(kernels) == KERNELS
    assert math.isnan(kernels["exact_hvp"]["seconds"]) and "unsharded" in kernels["exact_hvp"]["note"]
    for name in KERNELS - {"exact_hvp"}:
        assert kernels[name]["seconds"] > 0 and kernels[name]["workers"] == 2
    assert kernels["gradient"]["ratio_to_gradient"] == 1.0
    tools = {(r["tool"], r["layout"]) for r in result["slq"]}
    assert tools == {("hessian-spectrum", "1x1"), ("hessian-spectrum", "1x2"),
                     ("hessian-eigenthings (finite_difference)", "1 process"),
                     ("hessian-eigenthings (autograd)", "1 process")}
    assert all(r["seconds"] > 0 and math.isfinite(r["lambda_max"]) for r in result["slq"])
    ours = [r for r in result["slq"] if r["tool"] == "hessian-spectrum"]
    # the end-to-end rows run what a user gets (the config's eps and checkpoint settings), labelled as such
    assert all(r["settings"] == "hvp.eps=0.001" for r in ours)
    for r in ours:  # the fixed cost is wall time minus the probes' steps, and the phases account for it
        assert 0 < r["fixed_seconds"] < r["seconds"] and 0 < r["fixed_fraction"] < 1
        assert all(r[f"{p}_seconds"] is not None and r[f"{p}_seconds"] >= 0 for p in ("startup", "probes", "finish"))
    assert os.path.exists(tmp_path / "out" / "bench" / "bench.parquet")
    # the top 3 eigenpairs, converged by both tools at the same eps: the same eigenvalues, each tool's HVPs counted
    ours, peer = result["eigen"]
    assert (ours["tool"], peer["tool"]) == ("hessian-spectrum", "hessian-eigenthings")
    assert ours["converged"] == peer["converged"] == 3 and ours["eps"] == peer["eps"]
    assert ours["hvps"] > 0 and peer["hvps"] >= 6 and ours["seconds"] > 0 and peer["seconds"] > 0
    top = sorted(ours["eigenvalues"], reverse=True)
    assert np.allclose(top, sorted(peer["eigenvalues"], reverse=True), rtol=0, atol=1e-5 * abs(top[0]))
    printed = capsys.readouterr().out
    assert "fd_hvp_central" in printed and "top-k eigenpairs" in printed


def test_gpu_script_runs_its_code_path_on_cpu(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "..", "..", "..", "bench", "gpu_bench.py")
    done = subprocess.run([sys.executable, script, str(tmp_path), "--device", "cpu", "--tiny", "--repeats", "1",
                           "--dtype", "float32"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.load(open(tmp_path / "gpu_bench.json"))["rows"]
    assert {r["kernel"] for r in rows} == KERNELS and all(r["seconds"] > 0 for r in rows)
