"""Loading through the pipeline: a DCP checkpoint as model.path (preflight key check, exit 2 before Ray), the
model.loading choice, and an end-to-end run whose run.json records how each rank loaded and what it cost."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pipeline.cli import main
from pipeline_fixtures import assets, write_config

pytestmark = pytest.mark.usefixtures("shared_ray")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The pipeline fixtures' tiny GPT-NeoX folder, its data, and the same weights as DCP checkpoints."""
    import torch.distributed.checkpoint as dcp

    from actors.model_loading import ModelSpec, load_model

    tmp = tmp_path_factory.mktemp("loading-pipeline")
    model, data = assets(str(tmp))
    state = load_model(ModelSpec(path=model, dtype="float64")).state_dict()
    dcp.save(state, checkpoint_id=str(tmp / "dcp"), no_dist=True)
    bad = {k: v for k, v in state.items() if not k.endswith("final_layer_norm.weight")}
    dcp.save(bad, checkpoint_id=str(tmp / "dcp-bad"), no_dist=True)
    return {"model": model, "data": data, "dcp": str(tmp / "dcp"), "dcp_bad": str(tmp / "dcp-bad"), "tmp": str(tmp)}


CASES = [
    ("dcp_bad", ["model.config_path={model}"], "has no key 'gpt_neox.final_layer_norm.weight'"),
    ("dcp", [], "model.config_path"),
    ("dcp", ["model.config_path={tmp}"], "model.config_path"),  # a folder without config.json
    ("dcp", ["model.config_path={model}", "model.loading=full"], "model.loading"),
    ("model", ["model.init=random", "model.loading=sharded"], "model.loading=sharded"),
]


@pytest.mark.parametrize("model,sets,expected", CASES, ids=[c[2][:30] for c in CASES])
def test_bad_loading_input_exits_2_before_ray(files, model, sets, expected, tmp_path, capsys, no_ray):
    config = write_config(str(tmp_path / "c.yaml"), model=files[model], data=files["data"],
                          output_dir=str(tmp_path / "out"))
    args = ["run", config] + [a for s in sets for a in ("--set", s.format(**files))]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert expected in err, err


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
