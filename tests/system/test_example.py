"""examples/fsdp_timeseries.py under torchrun (2 gloo ranks on 127.0.0.1), and `plot` on its time series."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.worker import free_port
from pipeline.cli import main
from pipeline.studies.timeseries import steps_of_runs

pytestmark = pytest.mark.slow  # Ray, subprocess runs or simulated clusters: outside `-m "not slow"`

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_fsdp_example_writes_its_time_series_and_plot_draws_it(tmp_path):
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
           os.path.join(ROOT, "examples", "fsdp_timeseries.py"), "--out", str(tmp_path),
           "--steps", "4", "--every", "2", "--probes", "1", "--lanczos-steps", "4"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pq.read_table(tmp_path / "timeseries.parquet")
    assert table.column("step").to_pylist() == [0, 2, 4]
    assert {"lambda_max", "trace", "outlier_count", "whole_block_rel_error", "loss"} <= set(table.column_names)
    assert all(v > 0 for v in table.column("lambda_max").to_pylist())
    assert main(["plot", str(tmp_path / "timeseries.parquet")]) == 0
    png = tmp_path / "timeseries.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_comparison_over_checkpoints(tmp_path):
    runs = ["/s/model.path=ckpt-200", "/s/model.path=ckpt-50", "/s/model.path=ckpt-100"]
    assert steps_of_runs(runs)[0].tolist() == [200, 50, 100]
    assert steps_of_runs(["/s/base", "/s/tuned"])[0].tolist() == [0, 1]  # no numbers: the runs' order
    path = str(tmp_path / "compare.parquet")
    pq.write_table(pa.table({"run": runs, "lambda_max": [3.0, 1.0, 2.0], "trace": [1.0, 2.0, 3.0]}), path)
    out = str(tmp_path / "over.png")
    assert main(["plot", path, "--output", out]) == 0 and os.path.getsize(out) > 0


def test_plot_refuses_a_table_without_steps(tmp_path, capsys):
    path = str(tmp_path / "x.parquet")
    pq.write_table(pa.table({"value": [1.0]}), path)
    assert main(["plot", path]) == 2
    assert "neither a 'step' column" in capsys.readouterr().err
    assert main(["plot", str(tmp_path / "missing.parquet")]) == 2


def test_the_trainer_callback_example_writes_tensorboard_scalars_and_their_figure(tmp_path):
    pytest.importorskip("tensorboard")
    png = tmp_path / "scalars.png"
    cmd = [sys.executable, os.path.join(ROOT, "examples", "hf_trainer_callback.py"), "--out", str(tmp_path / "run"),
           "--steps", "10", "--every", "5", "--probes", "1", "--lanczos-steps", "4", "--plot", str(png)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pq.read_table(tmp_path / "run" / "hessian_timeseries.parquet")
    assert table.column("step").to_pylist() == [5, 10]
    assert main(["plot", str(tmp_path / "run" / "hessian_timeseries.parquet")]) == 0  # the callback's series plots
