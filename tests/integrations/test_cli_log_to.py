"""The CLI's log_to key: a finished run writes its key figures to TensorBoard and MLflow's local store (read back from
their files) at step 0, a sweep one step per point (a checkpoint sweep at the checkpoints' numbers), and a bad entry is
refused in one line before anything runs."""

from __future__ import annotations

import glob
import json
import os

import pytest

from pipeline.cli import main
from pipeline.run.config import ConfigError, load_config

pytest.importorskip("tensorboard")


def _tb(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.mark.slow
@pytest.mark.xdist_group("pipeline")
@pytest.mark.usefixtures("shared_ray")
def test_a_run_logs_its_key_figures_at_its_end(tmp_path):
    pytest.importorskip("mlflow")
    from pipeline_fixtures import assets, write_config

    model, data = assets(str(tmp_path))
    config = write_config(str(tmp_path / "c.yaml"), model=model, data=data, output_dir=str(tmp_path / "out"),
                          hvp={"eps": 1e-4, "assess": False}, lanczos={"steps": 4, "probes": 1},
                          log_to=[f"tensorboard:{tmp_path / 'tb'}", f"mlflow:{tmp_path / 'mlruns'}"])
    assert main(["run", config]) == 0
    info = json.load(open(tmp_path / "out" / "run.json"))
    scalars = _tb(tmp_path / "tb")
    assert scalars["hessian/lambda_max"] == [(0, pytest.approx(info["summary"]["lambda_max"], rel=1e-6))]
    assert scalars["hessian/hvp_count"] == [(0, info["timing"]["hvp_count"])]
    [path] = glob.glob(str(tmp_path / "mlruns" / "*" / "*" / "metrics" / "hessian" / "trace"))
    _, value, step = open(path).read().split()
    assert int(step) == 0 and float(value) == info["summary"]["trace"]


def test_a_sweep_logs_one_step_per_point_at_the_checkpoint_numbers(tmp_path):
    from pipeline.studies.sweep import _log_points

    result = []
    for n, value in ((200, 3.0), (50, 1.0), (100, 2.0)):
        name = f"model.path=checkpoint-{n}"
        os.makedirs(tmp_path / name)
        with open(tmp_path / name / "run.json", "w") as f:
            json.dump({"summary": {"lambda_max": value, "trace": 10 * value}, "eps": 1e-3,
                       "timing": {"hvp_count": 8, "total_seconds": 1.5}}, f)
        result.append({"run": name, "status": "complete"})
    result.append({"run": "model.path=checkpoint-300", "status": "failed"})  # no figures from a failed point
    _log_points([f"tensorboard:{tmp_path / 'tb'}"], result, out_dir=str(tmp_path))
    _log_points([], result, out_dir=str(tmp_path))  # nothing named: nothing opened
    scalars = _tb(tmp_path / "tb")
    assert sorted(scalars["hessian/lambda_max"]) == [(50, 1.0), (100, 2.0), (200, 3.0)]
    assert sorted(scalars["hessian/trace"]) == [(50, 10.0), (100, 20.0), (200, 30.0)]


def test_a_bad_log_to_entry_is_refused_in_one_line():
    demo = ["model.path=builtin:demo", "data.path=builtin:demo"]
    with pytest.raises(ConfigError, match="log_to: log_to entry 'tensorbord:x': expected 'tensorboard:DIR'"):
        load_config(None, demo + ['log_to=["tensorbord:x"]'])
    with pytest.raises(ConfigError, match="log_to: 'wandb' is not valid; expected a list of str"):
        load_config(None, demo + ["log_to=wandb"])
    assert load_config(None, demo + ['log_to=["wandb", "tensorboard:tb"]']).log_to == ["wandb", "tensorboard:tb"]
