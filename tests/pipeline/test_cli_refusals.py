"""Small command-line mistakes refused before any work: exit 2 and one line naming what is wrong and what fits."""

import json
import os

import pytest
import yaml

from pipeline.cli import main
from pipeline.run.config import ConfigError, load_config
from pipeline.run.preflight import check_output_dir
from pipeline_fixtures import write_config


@pytest.fixture
def files(tmp_path):
    """Paths that are never read: every refusal here comes before the model or the data is looked at."""
    return {"model": str(tmp_path / "no-model"), "data": str(tmp_path / "no-data.parquet")}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_report_into_a_folder_that_cannot_be_written(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "running", "config": {"lanczos": {"probes": 2}}}))
    blocker = tmp_path / "a-file"  # a path under a regular file cannot be created, even by root
    blocker.write_text("x")
    assert main(["report", str(run), "--output", str(blocker / "sub" / "report.html")]) == 2
    assert "--output" in one_line(capsys)
    assert main(["report", str(run), "--output", str(tmp_path / "ok" / "report.html")]) == 0
    assert (tmp_path / "ok" / "report.html").exists()


def test_bench_refuses_a_layout_that_cannot_be_placed_before_it_starts(files, tmp_path, capsys, no_ray):
    config = write_config(str(tmp_path / "c.yaml"), output_dir=str(tmp_path / "out"), **files)  # batch_size 4
    assert main(["bench", config, "--layouts", "1x1,1x3", "--no-kernels", "--peers", ""]) == 2
    err = one_line(capsys)
    assert "1x3" in err and "1, 2, 4" in err, err
    assert not (tmp_path / "out").exists()


def test_a_different_config_on_an_output_dir_names_the_first_differing_key(files, tmp_path):
    out = tmp_path / "out"
    config = load_config(write_config(str(tmp_path / "c.yaml"), output_dir=str(out), **files))
    earlier = config.to_dict()
    earlier["lanczos"]["steps"] = 7
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"status": "complete", "config": earlier}))
    with pytest.raises(ConfigError) as refused:  # the preflight's last check, after the model and data ones
        check_output_dir(config, fresh=False)
    assert "lanczos.steps: 7 before, 30 now" in str(refused.value)


def test_sweep_values_that_parse_equal_are_refused(files, tmp_path, capsys, no_ray):
    config = write_config(str(tmp_path / "c.yaml"), output_dir=str(tmp_path / "sweep"), **files)
    assert main(["sweep", config, "--grid", "lanczos.steps=3,03"]) == 2
    err = one_line(capsys)
    assert "'03'" in err and "'3'" in err, err
    assert not os.path.exists(tmp_path / "sweep" / "steps=3")
    assert yaml.safe_load("03") == 3  # the reason: YAML reads both as the integer 3


@pytest.mark.parametrize("override,needle", [
    ("eigen.k=-1", "eigen.k must be >= 0"),
    ("eigen.which=LR", "eigen.which: 'LR' is not valid; expected 'LA' or 'SA' or 'LM'"),
    ("eigen.tol=0", "eigen.tol must be > 0"),
    ("eigen.max_hvps=0", "eigen.max_hvps must be >= 1"),
    ("eigen.basis=4", "eigen.basis must be >= eigen.k + 2 = 5"),
    ("eigen.save_vectors=maybe", "eigen.save_vectors: 'maybe' is not valid; expected bool"),
    ("eigen.landscape.points_1d=20", "eigen.landscape.points_1d must be an odd number >= 3"),
    ("eigen.landscape.points_2d=1", "eigen.landscape.points_2d must be an odd number >= 3"),
    ("eigen.landscape.range=-1", "eigen.landscape.range must be > 0 or 'auto'"),
    ("eigen.landscape.steps=3", "unknown config key 'eigen.landscape.steps'"),
])
def test_a_bad_eigen_value_exits_2_in_one_line_before_ray(files, tmp_path, capsys, no_ray, override, needle):
    config = write_config(str(tmp_path / "c.yaml"), output_dir=str(tmp_path / "out"), eigen={"k": 3}, **files)
    assert main(["run", config, "--set", override]) == 2
    err = one_line(capsys)
    assert needle in err, err
    assert not (tmp_path / "out").exists()


def test_eigen_k_beyond_the_models_dimension_exits_2_before_ray(tmp_path, capsys, no_ray):
    from pipeline_fixtures import assets

    model, data = assets(str(tmp_path))  # the tiny GPT-NeoX: 1,128 parameters, counted on the meta device
    config = write_config(str(tmp_path / "c.yaml"), model=model, data=data, output_dir=str(tmp_path / "out"),
                          eigen={"k": 2000})
    assert main(["run", config]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "eigen.k=2000 exceeds the model's 1,128 parameters" in err[-1] and "Traceback" not in "".join(err)
    assert not (tmp_path / "out" / "run.json").exists()  # refused by the preflight, before the run records anything
