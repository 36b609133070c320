"""Loading through the pipeline: checkpoints that would not load exactly (a missing tensor on the full and the
sharded path, a corrupt DCP metadata or data file, shapes of another architecture, an unknown dtype) and bad
loading choices refused by the preflight (exit 2 before Ray), and an end-to-end run whose run.json records how
each rank loaded and what it cost."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from pipeline.cli import main
from pipeline_fixtures import assets, write_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray")]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The pipeline fixtures' tiny GPT-NeoX folder, its data, and the same weights as DCP checkpoints."""
    import torch.distributed.checkpoint as dcp

    from hessian_core.models import ModelSpec, load_model

    tmp = tmp_path_factory.mktemp("loading-pipeline")
    model, data = assets(str(tmp))
    state = load_model(ModelSpec(path=model, dtype="float64")).state_dict()
    dcp.save(state, checkpoint_id=str(tmp / "dcp"), no_dist=True)
    bad = {k: v for k, v in state.items() if not k.endswith("final_layer_norm.weight")}
    dcp.save(bad, checkpoint_id=str(tmp / "dcp-bad"), no_dist=True)
    out = {"model": model, "data": data, "dcp": str(tmp / "dcp"), "dcp_bad": str(tmp / "dcp-bad"), "tmp": str(tmp)}
    return {**out, **broken_copies(out, tmp)}


def broken_copies(files: dict, tmp) -> dict:
    """Copies of the folders above with one defect each (names as in CASES)."""
    import shutil

    from safetensors.torch import load_file, save_file

    def copy(src: str, name: str) -> str:
        shutil.copytree(src, tmp / name)
        return str(tmp / name)

    out = {name: copy(files["dcp"], name) for name in ("dcp_empty_meta", "dcp_cut_meta", "dcp_no_data",
                                                         "dcp_cut_data")}
    (tmp / "dcp_empty_meta" / ".metadata").write_bytes(b"")
    meta = (tmp / "dcp_cut_meta" / ".metadata").read_bytes()
    (tmp / "dcp_cut_meta" / ".metadata").write_bytes(meta[:len(meta) // 2])
    data_files = sorted(p.name for p in (tmp / "dcp").iterdir() if p.suffix == ".distcp")
    (tmp / "dcp_no_data" / data_files[0]).unlink()
    cut = tmp / "dcp_cut_data" / data_files[-1]
    cut.write_bytes(cut.read_bytes()[:-100])
    wider = tmp / "wider-config"  # the same architecture with a wider MLP: the DCP's shapes are not its
    wider.mkdir()
    config = json.load(open(os.path.join(files["model"], "config.json")))
    (wider / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    out["wider_config"] = str(wider)
    weights = os.path.join(copy(files["model"], "st_missing"), "model.safetensors")  # one MLP weight deleted
    save_file({k: v for k, v in load_file(weights).items() if "dense_4h_to_h.weight" not in k}, weights,
              metadata={"format": "pt"})
    weights = os.path.join(copy(files["model"], "st_dtype"), "model.safetensors")
    raw = open(weights, "rb").read()
    open(weights, "wb").write(raw.replace(b'"F64"', b'"Q64"', 1))  # same length: the offsets stay right
    return {"st_missing": str(tmp / "st_missing"), "st_dtype": str(tmp / "st_dtype"), **out}


CASES = [
    ("dcp_bad", ["model.config_path={model}"], "has no key 'gpt_neox.final_layer_norm.weight'"),
    ("st_missing", [], "has no key 'gpt_neox.layers.0.mlp.dense_4h_to_h.weight'"),  # the full load
    ("st_missing", ["model.loading=sharded"], "has no key 'gpt_neox.layers.0.mlp.dense_4h_to_h.weight'"),
    ("st_missing", ["cluster.num_workers=2"], "has no key 'gpt_neox.layers.0.mlp.dense_4h_to_h.weight'"),
    ("st_dtype", [], "as dtype 'Q64'"),
    ("dcp_empty_meta", ["model.config_path={model}"], "dcp_empty_meta/.metadata' is empty or corrupt"),
    ("dcp_cut_meta", ["model.config_path={model}"], "dcp_cut_meta/.metadata' is empty or corrupt"),
    ("dcp_no_data", ["model.config_path={model}"], "lacks the data file '{tmp}/dcp_no_data/__0_0.distcp'"),
    ("dcp_cut_data", ["model.config_path={model}"], "has a truncated data file '{tmp}/dcp_cut_data/__0_0.distcp'"),
    ("dcp", ["model.config_path={wider_config}"], "'gpt_neox.layers.0.mlp.dense_h_to_4h.weight' with shape [16, 8]"),
    ("dcp", [], "model.config_path"),
    ("dcp", ["model.config_path={tmp}"], "model.config_path"),  # a folder without config.json
    ("dcp", ["model.config_path={model}", "model.loading=full"], "model.loading"),
    ("model", ["model.init=random", "model.loading=sharded"], "model.loading=sharded"),
]


@pytest.mark.parametrize("model,sets,expected", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_loading_input_exits_2_before_ray(files, model, sets, expected, tmp_path, capsys, no_ray):
    config = write_config(str(tmp_path / "c.yaml"), model=files[model], data=files["data"],
                          output_dir=str(tmp_path / "out"))
    args = ["run", config] + [a for s in sets for a in ("--set", s.format(**files))]
    started = time.monotonic()
    assert main(args) == 2
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected.format(**files) in err, err


def test_dcp_run_on_two_ranks_equals_the_hf_folder_run(files, tmp_path):
    """The same weights from DCP (sharded read) and from the HF folder (sharded read on 2 ranks): same alpha and
    beta; run.json records how each rank loaded and its load memory."""
    import pandas as pd

    alphas = {}
    for name, path, sets in (("dcp", files["dcp"], ["--set", f"model.config_path={files['model']}"]),
                             ("hf", files["model"], [])):
        out = str(tmp_path / name)
        config = write_config(str(tmp_path / f"{name}.yaml"), model=path, data=files["data"], output_dir=out,
                              cluster={"num_workers": 2}, lanczos={"steps": 4, "probes": 1})
        assert main(["run", config, *sets]) == 0
        info = json.load(open(os.path.join(out, "run.json")))
        formed = [g for g in info["groups"] if g["event"] == "formed"][0]
        assert formed["loading_per_rank"] == ["sharded", "sharded"]
        for memory in formed["load_memory_per_rank"]:
            assert memory["peak_rss_mib"] >= memory["rss_before_mib"] > 0 and memory["peak_growth_mib"] >= 0
        alphas[name] = torch.tensor(pd.read_parquet(os.path.join(out, "lanczos.parquet"))["alpha"].to_numpy())
    assert torch.equal(alphas["dcp"], alphas["hf"])


def test_plan_reads_a_dcp_checkpoints_architecture_from_config_path(files, tmp_path, capsys, no_ray):
    """`plan` and the run's verdict line on a DCP model.path: the architecture of model.config_path, as for the
    HF folder it came from."""
    from pipeline.run.config import load_config
    from pipeline.run.plan import verdict_line

    lines = {}
    for name, sets in (("dcp", ["--set", f"model.config_path={files['model']}"]), ("model", [])):
        config = write_config(str(tmp_path / f"{name}.yaml"), model=files[name], data=files["data"],
                              output_dir=str(tmp_path / "out"))
        assert main(["plan", config, *sets]) == 0
        lines[name] = capsys.readouterr().out.splitlines()[0]
    assert lines["dcp"] == lines["model"] and lines["dcp"].startswith("model: ")
    config = load_config(str(tmp_path / "dcp.yaml"), [f"model.config_path={files['model']}"])
    assert not verdict_line(config, model_path=files["dcp"]).startswith("plan: unavailable")
