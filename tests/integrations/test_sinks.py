"""log_to sinks: TensorBoard, MLflow's local file store and W&B offline each receive the same hessian/* scalars at the
same steps (read back from their own files), and a callable; bad names refused in one line."""

from __future__ import annotations

import glob
import os
import time

import pytest

from hessian_core.integrations.sinks import open_sinks, parse_sink

STEPS = {10: {"hessian/lambda_max": 3.5, "hessian/trace": 12.25}, 20: {"hessian/lambda_max": 4.0,
                                                                     "hessian/trace": 11.5}}


def _write(specs) -> None:
    sinks = open_sinks(specs)
    for step, metrics in STEPS.items():
        sinks.log(metrics, step)
    sinks.close()


def test_tensorboard_and_a_callable(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seen = []
    _write([f"tensorboard:{tmp_path / 'tb'}", lambda m, s: seen.append((s, m))])
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    for key in ("hessian/lambda_max", "hessian/trace"):
        assert [(e.step, e.value) for e in acc.Scalars(key)] == [(s, m[key]) for s, m in STEPS.items()]
    assert seen == list(STEPS.items())


def test_mlflow_local_store(tmp_path):
    pytest.importorskip("mlflow")
    _write([f"mlflow:{tmp_path / 'mlruns'}"])
    # the file store's own layout: <experiment>/<run>/metrics/<key> with lines "timestamp value step"
    files = glob.glob(str(tmp_path / "mlruns" / "*" / "*" / "metrics" / "hessian" / "*"))
    got = {}
    for path in files:
        with open(path) as f:
            got[f"hessian/{os.path.basename(path)}"] = [(int(s), float(v)) for _, v, s in
                                                       (line.split() for line in f if line.strip())]
    for key in ("hessian/lambda_max", "hessian/trace"):
        assert got[key] == [(s, m[key]) for s, m in STEPS.items()]


def _wandb_records(path: str) -> list[bytes]:
    """The protobuf records of a .wandb file: a 7-byte header (":W&B", magic 0xBEE1, version), then LevelDB's log
    format (32 KiB blocks of records, each crc32 (4) + length (2) + type (1: full, 2-4: first, middle, last))."""
    import struct

    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:4] == b":W&B"
    out, pending, pos = [], b"", 7
    while pos + 7 <= len(raw):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data = raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = data if kind in (1, 2) else pending + data
        if kind in (1, 4):
            out.append(pending)
    return out


def test_wandb_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    _write([f"wandb:{tmp_path}"])
    from wandb.proto import wandb_internal_pb2

    [path] = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    deadline = time.monotonic() + 30
    kinds = lambda recs: [wandb_internal_pb2.Record.FromString(d).WhichOneof("record_type") for d in recs]  # noqa: E731
    while "exit" not in kinds(records := _wandb_records(path)) and time.monotonic() < deadline:
        time.sleep(0.2)  # wandb's service process may still be flushing the file when finish() returns
    rows = []
    for data in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): i.value_json for i in record.history.item})
    got = [(int(r["_step"]), {k: float(r[k]) for k in ("hessian/lambda_max", "hessian/trace")}) for r in rows]
    assert got == list(STEPS.items())


def test_bad_sink_names():
    for bad in ("tensorboard", "tensorbord:x", "mlflow:", "neptune:x"):
        with pytest.raises(ValueError, match=f"log_to entry {bad!r}: expected 'tensorboard:DIR'"):
            parse_sink(bad)
    with pytest.raises(ValueError, match="log_to entry 3"):
        open_sinks([3])
