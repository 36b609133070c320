"""Bad input is refused before any Ray or model work: exit 2 and one line naming the key or value."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline_fixtures import assets, write_config, write_input_ids


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-input")
    model, data = assets(str(tmp))
    no_weights = tmp / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(open(os.path.join(model, "config.json")).read())
    empty = tmp / "empty.jsonl"
    empty.write_text("")
    unequal = tmp / "unequal.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2, 3], [1, 2]]}), unequal)
    few = write_input_ids(str(tmp / "few.parquet"), sequences=3)
    return {"model": model, "data": data, "no_weights": str(no_weights), "empty": str(empty),
            "unequal": str(unequal), "few": few, "tmp": str(tmp)}


CASES = [
    ({"set": ["lanczos.stepz=3"]}, "lanczos.stepz"),
    ({"set": ["lanczos.steps=many"]}, "lanczos.steps"),
    ({"set": ["cluster.use_gpu=maybe"]}, "cluster.use_gpu"),
    ({"set": ["lanczos.steps=0"]}, "lanczos.steps"),
    ({"set": ["lanczos.probes=0"]}, "nothing to compute"),
    ({"set": ["lanczos.probes=-1"]}, "lanczos.probes"),
    ({"set": ["hvp.eps=auto", "hvp.assess=false"]}, "hvp.assess=false needs a fixed hvp.eps"),
    ({"set": ["cluster.num_workers=0"]}, "cluster.num_workers"),
    ({"set": ["cluster.num_groups=0"]}, "cluster.num_groups"),
    ({"set": ["data.batch_size=0"]}, "data.batch_size"),
    ({"set": ["data.seq_len=0"]}, "data.seq_len"),
    ({"set": ["data.num_batches=0"]}, "data.num_batches"),
    ({"set": ["lanczos.window=-1"]}, "lanczos.window"),
    ({"set": ["hvp.eps=0"]}, "hvp.eps"),
    ({"set": ["hvp.eps=-1e-3"]}, "hvp.eps"),
    ({"set": ["lanczos.reorth=partial"]}, "lanczos.reorth"),
    ({"set": ["data.batch_size=3", "cluster.num_workers=2"]}, "not divisible"),
    ({"set": ["cluster.use_gpu=true"]}, "cluster.use_gpu"),
    ({"model": "{tmp}/missing-model"}, "model.path"),
    ({"model": "{no_weights}"}, "no weights"),
    ({"data": "{tmp}/missing.jsonl"}, "data.path"),
    ({"data": "{empty}"}, "empty"),
    ({"data": "{few}"}, "3 sequences"),
    ({"data": "{unequal}"}, "unequal lengths"),
    ({"set": ["data.seq_len=16"]}, "data.seq_len"),
    ({"set": ["cluster.address=ray://127.0.0.1:1"]}, "cluster.address"),
    ({"set": ["cluster.address=127.0.0.1:1"]}, "cluster.address"),
    ({"config": "{tmp}/missing.yaml"}, "missing.yaml"),
]


@pytest.mark.parametrize("case,expected", CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(CASES)])
def test_bad_input_exits_2_with_one_line(files, case, expected, tmp_path, capsys, no_ray):
    fmt = {k: v for k, v in files.items()}
    config = write_config(str(tmp_path / "c.yaml"), model=case.get("model", files["model"]).format(**fmt),
                          data=case.get("data", files["data"]).format(**fmt),
                          output_dir=str(tmp_path / "out"))
    if "config" in case:
        config = case["config"].format(**fmt)
    args = ["run", config] + [a for s in case.get("set", []) for a in ("--set", s)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err


def test_unwritable_output_dir_is_refused(files, tmp_path, capsys):
    """A path under a regular file cannot be created, even by root (a read-only folder would not stop root)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = write_config(str(tmp_path / "c.yaml"), model=files["model"], data=files["data"],
                          output_dir=str(blocker / "out"))
    assert main(["run", config]) == 2
    err = capsys.readouterr().err.strip()
    assert "output_dir" in err and len(err.splitlines()) == 1


def test_cli_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["frobnicate"])
    assert info.value.code == 2


def test_auto_address_without_a_cluster_is_refused_quickly(files, tmp_path, capsys, monkeypatch):
    import time

    import ray._private.services as services
    import ray._private.utils as ray_utils

    # a machine without a cluster, even when someone's `ray start` runs beside the tests: "auto" would join any
    # Ray whose GCS process it finds, or the one in the address file
    def no_gcs() -> list:
        return []

    no_gcs.cache_clear = lambda: None  # Ray clears the discovery cache through the function
    monkeypatch.setattr(services, "find_gcs_addresses", no_gcs)
    monkeypatch.setattr(ray_utils, "read_ray_address", lambda temp_dir=None: None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    config = write_config(str(tmp_path / "c.yaml"), model=files["model"], data=files["data"],
                          output_dir=str(tmp_path / "out"), cluster={"address": "auto"})
    started = time.monotonic()
    assert main(["run", config]) == 2
    assert time.monotonic() - started < 30  # the bound: fail fast instead of retrying for minutes
    err = capsys.readouterr().err.strip()
    assert "cluster.address" in err and len(err.splitlines()) == 1
