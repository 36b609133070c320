"""HessianSpectrumCallback in a real transformers.Trainer fine-tune (a tiny GPT-NeoX on CPU, 40 steps, every 10):
the hessian/* scalars in TensorBoard's event files (read back with TensorBoard's own reader) and in the Parquet time
series, training bitwise that of the same fine-tune without the callback, and the refusals."""

from __future__ import annotations

import glob

import pyarrow.parquet as pq
import pytest
import torch

pytest.importorskip("tensorboard")
pytestmark = pytest.mark.xdist_group("hf_callback")  # one worker builds the module's fine-tunes once

from tests_integrations_helpers import finetune  # noqa: E402

STEPS, EVERY = 40, 10


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from hessian_core.integrations import HessianSpectrumCallback

    root = tmp_path_factory.mktemp("hf")
    seen = []
    with_cb = finetune(root / "with", steps=STEPS, callback=lambda: HessianSpectrumCallback(
        every_steps=EVERY, eval_batches=2, probes=1, steps=6, eps=1e-3,
        log_to=[lambda metrics, step: seen.append((step, metrics))]))
    without = finetune(root / "without", steps=STEPS, callback=None)
    return with_cb, without, seen


def _event_scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for path in glob.glob(str(folder / "**" / "events.out.tfevents.*"), recursive=True):
        acc = EventAccumulator(path, size_guidance={"scalars": 0}, purge_orphaned_data=False)
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def test_tensorboard_holds_the_hessian_scalars_at_every_tenth_step(runs):
    with_cb, _, _ = runs
    scalars = _event_scalars(with_cb.folder)
    for key in ("lambda_max", "lambda_min", "trace", "outlier_count", "block_diagonal_error"):
        assert sorted(scalars[f"train/hessian/{key}"]) == [10, 20, 30, 40], key  # HF's TB callback adds train/
    assert all(v > 0 for v in scalars["train/hessian/lambda_max"].values())
    assert all(0 < v < 2 for v in scalars["train/hessian/block_diagonal_error"].values())
    assert sorted(scalars["train/loss"]) == list(range(1, STEPS + 1))  # the Trainer's own scalars beside them


def test_parquet_series_and_sinks_hold_the_same_rows(runs):
    with_cb, _, seen = runs
    table = pq.read_table(with_cb.folder / "hessian_timeseries.parquet").to_pylist()
    assert [r["step"] for r in table] == [10, 20, 30, 40]
    assert [s for s, _ in seen] == [10, 20, 30, 40]
    for row, (_, metrics) in zip(table, seen):
        assert metrics["hessian/lambda_max"] == row["lambda_max"]
        assert metrics["hessian/block_diagonal_error"] == row["whole_block_rel_error"]
    logged = [e for e in with_cb.log_history if "hessian/lambda_max" in e]
    assert [e["step"] for e in logged] == [10, 20, 30, 40]


def test_training_is_bitwise_that_without_the_callback(runs):
    with_cb, without, _ = runs
    assert with_cb.losses == without.losses and len(with_cb.losses) == STEPS
    assert with_cb.params.keys() == without.params.keys()
    for name, p in with_cb.params.items():
        assert torch.equal(p, without.params[name]), name


def test_refusals(tmp_path):
    from hessian_core.integrations import HessianSpectrumCallback
    from hessian_core.integrations.monitor import analysed_module

    with pytest.raises(ValueError, match="every_steps must be an integer >= 1, got 0"):
        HessianSpectrumCallback(every_steps=0)
    with pytest.raises(ValueError, match="track 'top'"):
        HessianSpectrumCallback(track="top")
    with pytest.raises(ValueError, match="log_to entry 'tensorbord:x'"):
        HessianSpectrumCallback(log_to=["tensorbord:x"])
    with pytest.raises(RuntimeError, match=r"callback.attach\(trainer\)"):
        finetune(tmp_path, steps=1, callback=lambda: HessianSpectrumCallback(every_steps=1), attach=False)

    import torch.distributed.fsdp as fsdp
    fake = torch.nn.Sequential(torch.nn.Linear(2, 2))
    fake.__class__ = type("FullyShardedDataParallel", (fsdp.FullyShardedDataParallel,), {})  # no process group needed
    with pytest.raises(ValueError, match="FSDP1 .* not supported: use FSDP2"):
        analysed_module(fake)


@pytest.mark.slow
def test_two_gloo_ranks_under_the_trainers_ddp_and_on_fsdp2(tmp_path):
    """2 ranks (torchrun, gloo, 127.0.0.1). ddp: the Trainer wraps the model in DDP; the callback analyses the inner
    module with every rank's eval batch gathered on every rank, logs at 10..40, and training is bitwise that without
    it. (Asked for FSDP2, accelerate runs DDP on CPU: see hf_dist_worker.py.) fsdp2-direct: the callback on a
    fully_shard model in a plain loop: sharded, logged at 10 and 20, training bitwise untouched."""
    import os
    import subprocess
    import sys

    from actors.worker import free_port

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    worker = os.path.join(root, "tests", "integrations", "hf_dist_worker.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), worker, str(tmp_path),
                           "ddp+fsdp2-direct"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = torch.load(tmp_path / "ddp" / "results.pt", weights_only=False)
    with_cb, without = results["with"], results["without"]
    assert with_cb["world"] == 2 and not with_cb["sharded"]
    assert with_cb["losses"] == without["losses"] and len(with_cb["losses"]) == STEPS
    for name, p in with_cb["params"].items():
        assert torch.equal(p, without["params"][name]), name
    logged = [e for e in with_cb["log_history"] if "hessian/lambda_max" in e]
    assert [e["step"] for e in logged] == [10, 20, 30, 40] and all(e["hessian/lambda_max"] > 0 for e in logged)
    assert [r["step"] for r in pq.read_table(tmp_path / "ddp" / "with" / "hessian_timeseries.parquet").to_pylist()] == [
        10, 20, 30, 40]
    fsdp2 = torch.load(tmp_path / "fsdp2-direct" / "results.pt", weights_only=False)
    with_cb, without = fsdp2["with"], fsdp2["without"]
    assert with_cb["sharded"] and torch.equal(with_cb["losses"], without["losses"])
    for name, p in with_cb["params"].items():
        assert torch.equal(p, without["params"][name]), name
    assert len(with_cb["logged"]) == 2 and all(e["hessian/lambda_max"] > 0 for e in with_cb["logged"])
    steps = pq.read_table(tmp_path / "fsdp2-direct" / "with" / "hessian_timeseries.parquet").column("step")
    assert steps.to_pylist() == [10, 20]


def test_track_lambda_max_warm_starts_from_the_previous_measurement(tmp_path):
    from hessian_core.integrations import HessianSpectrumCallback

    holder = {}

    def make():
        holder["cb"] = HessianSpectrumCallback(every_steps=5, eval_batches=1, track="lambda_max", eps=1e-3, tol=1e-3)
        return holder["cb"]

    run = finetune(tmp_path, steps=15, callback=make, report_to=())
    rows = holder["cb"].rows
    assert [r["step"] for r in rows] == [5, 10, 15] and [r["warm"] for r in rows] == [False, True, True]
    assert all(r["converged"] and r["lambda_max"] > 0 for r in rows)
    logged = [e for e in run.log_history if "hessian/lambda_max" in e]
    assert [e["hessian/lambda_max"] for e in logged] == [r["lambda_max"] for r in rows]
    assert {"hessian/lambda_max_residual", "hessian/hvps"} <= set(logged[0])
