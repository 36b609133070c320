"""A tiny float64 GPT-NeoX saved as a Hugging Face folder and its analysis data as local files."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from helpers import make_batches, make_tiny_model

SEQ_LEN = 8


def write_model(folder: str) -> str:
    model = make_tiny_model("gpt_neox")
    model.save_pretrained(folder)
    return folder


def write_input_ids(path: str, *, sequences: int = 8, seq_len: int = SEQ_LEN) -> str:
    rows = make_batches(num_batches=1, batch_size=sequences, seq_len=seq_len, seed=7)[0].tolist()
    pq.write_table(pa.table({"input_ids": rows}), path)
    return path


def write_config(path: str, *, model: str, data: str, output_dir: str, **sections) -> str:
    config = {
        "model": {"path": model, "dtype": "float64"},
        "data": {"path": data, "seq_len": SEQ_LEN, "batch_size": 4, "num_batches": 2},
        # one torch thread per rank, as conftest gives each pytest process: on a tiny model a second thread has
        # nothing to do but spin (measured: 1.8 cores busy for 44 steps/s against 1.1 cores for 48 steps/s), and
        # with ``-n 2`` the suite is CPU-bound. The default (a local Ray shares out the cores) has its own tests.
        # keep_groups: a module's in-process runs on its shared Ray reuse the worker processes of the runs before
        # them (a group formation is ~6.5 CPU-seconds of process start and imports); the default has its own test
        "cluster": {"num_workers": 1, "num_groups": 1, "cpus_per_worker": 1, "keep_groups": True},
        "hvp": {"eps": 1e-3},
        "lanczos": {"steps": 30, "probes": 2, "reorth": "full", "vector_dtype": "float64"},
        "blocks": {"enabled": False},
        "output_dir": output_dir,
    }
    for key, value in sections.items():
        config[key] = {**config.get(key, {}), **value} if isinstance(value, dict) else value
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


def assets(tmp: str) -> tuple[str, str]:
    model = write_model(os.path.join(tmp, "model"))
    data = write_input_ids(os.path.join(tmp, "data.parquet"))
    return model, data
