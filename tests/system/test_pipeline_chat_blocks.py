"""Through Ray: chat data with assistant-only labels and padding reaches the ranks, and blocks.spectra writes
block_ritz.parquet (one task per (block, probe)) whose values are eigenvalues of the dense blocks H_bb."""

from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from data_fixtures import make_tokenizer, write_jsonl
from hessian_core import ParamSpace, analyze, parameter_blocks
from hessian_core.loss import rank_batches
from pipeline.cli import main
from pipeline.run.config import load_config
from pipeline.run.data import analysis_set, read_sequences
from pipeline_fixtures import write_config, write_model
from test_block_spectra import dense_block
from test_data_options import CONVERSATION
from test_masked_loss import dense_masked_hessian

SEQ_LEN = 24
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray"), pytest.mark.xdist_group("chat_blocks")]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory, shared_ray):
    tmp = tmp_path_factory.mktemp("chat")
    model = write_model(str(tmp / "model"))
    make_tokenizer(model)  # the model folder holds the tiny word-level tokenizer (24 ids < vocab 32)
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[:3]},
            {"messages": CONVERSATION[3:5]}]
    data = write_jsonl(str(tmp / "chat.jsonl"), rows)
    config = write_config(str(tmp / "chat.yaml"), model=model, data=data, output_dir=str(tmp / "run"),
                          cluster={"num_workers": 2}, hvp={"eps": 1e-5},
                          lanczos={"steps": 12, "probes": 1, "reorth": "full", "vector_dtype": "float64"},
                          blocks={"spectra": True, "probes": 1, "spectra_steps": 40})
    chat = ["data.seq_len=24", "data.batch_size=2", "data.num_batches=2", "data.format=chat", "data.loss=masked",
            "data.packing=false"]
    assert main(["run", config] + [a for kv in chat for a in ("--set", kv)]) == 0
    with open(config) as f:
        tree = yaml.safe_load(f)
    tree["data"].update(seq_len=SEQ_LEN, batch_size=2, num_batches=2, format="chat", loss="masked", packing=False)
    with open(config, "w") as f:
        yaml.safe_dump(tree, f)
    return config, str(tmp / "run")


def test_masked_chat_data_reaches_the_ranks(chat_run):
    config_path, run = chat_run
    config = load_config(config_path)
    batches = analysis_set(read_sequences(config.data, tokenizer_path=config.model.path), config.data)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=torch.float64).eval()
    local = analyze(model, rank_batches(batches, 0, 1), probes=1, steps=12, eps=1e-5, reorth="full")
    alphas = pq.read_table(os.path.join(run, "lanczos.parquet")).to_pandas().sort_values("step").alpha.to_numpy()
    # 2 FSDP2 ranks with masked, padded batches = one process with the whole set
    assert np.abs(alphas - local.lanczos[0].alphas.numpy()).max() <= 1e-8 * np.abs(alphas).max()


def test_block_ritz_values_are_eigenvalues_of_the_dense_blocks(chat_run):
    config_path, run = chat_run
    config = load_config(config_path)
    table = pq.read_table(os.path.join(run, "block_ritz.parquet")).to_pandas()
    assert list(table.columns) == ["block", "probe_id", "value", "weight", "block_size"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(config.model.path, dtype=torch.float64).eval()
    space = ParamSpace(model)
    blocks = parameter_blocks(model, space)
    assert set(table.block) == set(blocks)  # one task per (block, probe): every block ran
    batches = rank_batches(analysis_set(read_sequences(config.data, tokenizer_path=config.model.path), config.data),
                           0, 1)
    hessian = dense_masked_hessian(model, batches)
    for name, idx in blocks.items():
        rows = table[table.block == name]
        eig = torch.linalg.eigvalsh(dense_block(model, hessian, space, idx)).numpy()
        assert rows.block_size.iloc[0] == len(eig)
        assert np.isclose(rows.weight.sum(), 1.0)
        scale = max(np.abs(eig).max(), 1e-12)
        # every Ritz value lies in the block's spectrum; blocks no larger than the steps are resolved entirely
        assert rows.value.min() >= eig[0] - 1e-7 * scale and rows.value.max() <= eig[-1] + 1e-7 * scale
        if len(eig) <= 40:
            assert max(np.abs(eig - v).min() for v in rows.value) <= 1e-7 * scale
    assert os.path.getsize(os.path.join(run, "density.png")) > 0
