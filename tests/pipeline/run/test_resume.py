"""Resuming after the driver is SIGKILLed mid-probe; refusing another config on the same output_dir."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from hessian_core import latest_complete_step
from pipeline.cli import main
from pipeline.run.output_lock import LOCK_NAME
from pipeline_fixtures import assets, write_config
from proc_tools import alive, descendants, kill_all

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray")]  # the in-process runs; the interrupted sweep starts its own
STEPS = 60
SWEEP_STEPS = 100  # a probe of each point must still be running when the stop reaches it, on a loaded machine


def _sigkill_driver_when(cfg: str, reached, *, poll_seconds: float = 0.02, timeout: float = 120):
    """Run the CLI on ``cfg`` in a subprocess and SIGKILL its driver as soon as ``reached()`` returns a value (which is
    returned; None if the driver ended or stalled first). What the driver started itself is killed after it; its
    actors end with its job."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", cfg], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    value = None
    tree = set()
    while time.monotonic() < deadline and proc.poll() is None:
        value = reached()
        if value is not None:
            tree = descendants(proc.pid)
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(poll_seconds)
    proc.wait(timeout=60)
    kill_all(alive(tree))
    return value


def test_resume_after_driver_sigkill_gives_identical_alpha_beta_with_fewer_hvps(tmp_path, capsys, shared_ray_address):
    """With the auto settings (``lanczos.steps`` and ``probes: auto``): the killed run resumes without redoing the
    probe it finished (final: it stopped by its rule) nor the checkpointed steps of the next, and ends as the run
    never killed does, probe for probe and coefficient for coefficient."""
    model, data = assets(str(tmp_path))
    # a checkpoint every step: under load an auto interval can skip past step 5, or past the probe's end;
    # the killed driver joins the module's Ray (a driver's own local Ray and its cleanup: test_run_control)
    common = dict(model=model, data=data, lanczos={"steps": "auto", "max_steps": STEPS, "tol": 1e-2, "probes": "auto",
                                                   "max_probes": 3, "reorth": "window", "window": 4},
                  checkpoint={"every": 1}, cluster={"address": shared_ray_address})
    cfg = write_config(str(tmp_path / "run.yaml"), output_dir=str(tmp_path / "run"), **common)
    out = tmp_path / "run"

    def probe_one_past_step_5():
        found = latest_complete_step(str(out / "checkpoints" / "probe-00001"))
        return found[0] if (out / "lanczos.parquet").exists() and found and found[0] >= 5 else None

    killed_at = _sigkill_driver_when(cfg, probe_one_past_step_5)
    assert killed_at is not None, "the driver finished or stalled before it could be killed mid-probe"
    assert (out / LOCK_NAME).exists()  # the killed run's lock is left behind; the rerun takes it over

    interrupted = json.load(open(out / "run.json"))
    assert interrupted["status"] == "running"  # never "complete" for an incomplete run
    first = pq.read_table(out / "lanczos.parquet").to_pandas()
    assert first.probe_id.unique().tolist() == [0] and len(first) < STEPS  # probe 0 stopped early by its rule

    assert main(["run", cfg]) == 0
    info = json.load(open(out / "run.json"))
    assert info["status"] == "complete" and info["resumed"]
    assert info["resumed_from"]["finished_probes"] == [0]
    assert int(info["resumed_from"]["checkpoint_steps"]["1"]) >= killed_at
    resumed = pq.read_table(out / "lanczos.parquet").to_pandas()
    # neither probe 0 nor probe 1's checkpointed steps again
    assert info["timing"]["hvp_count"] <= len(resumed) - len(first) - killed_at
    assert not (out / "checkpoints").exists()

    clean_cfg = write_config(str(tmp_path / "clean.yaml"), output_dir=str(tmp_path / "clean"), **common)
    assert main(["run", clean_cfg]) == 0
    clean = pq.read_table(tmp_path / "clean" / "lanczos.parquet").to_pandas()
    clean_info = json.load(open(tmp_path / "clean" / "run.json"))
    assert info["probes_auto"]["probes"] == clean_info["probes_auto"]["probes"] == resumed.probe_id.nunique() >= 2
    assert len(resumed) == len(clean) < STEPS * resumed.probe_id.nunique()
    for col in ("probe_id", "step", "alpha", "beta"):
        assert np.array_equal(resumed[col].to_numpy(), clean[col].to_numpy()), col

    # another config on this output_dir is refused, unless asked for a fresh run
    capsys.readouterr()
    assert main(["run", cfg, "--set", "lanczos.steps=7"]) == 2
    assert "different config" in capsys.readouterr().err
    assert main(["run", cfg, "--set", "lanczos.steps=7", "--set", "lanczos.probes=1", "--fresh"]) == 0
    assert len(pq.read_table(out / "lanczos.parquet").to_pandas()) == 7


def _newest_checkpoint(point) -> tuple | None:
    """The newest complete checkpoint of whichever probe the point is running (probe 0 may be done)."""
    found = [latest_complete_step(str(point / "checkpoints" / f"probe-{k:05d}")) for k in range(2)]
    return max((f for f in found if f), default=None)


def test_ctrl_c_stops_a_sweep_promptly_and_the_same_command_resumes_it(tmp_path):
    model, data = assets(str(tmp_path))
    cfg = write_config(str(tmp_path / "sweep.yaml"), output_dir=str(tmp_path / "sweep"), model=model, data=data,
                       cluster={"num_groups": 2},
                       lanczos={"steps": SWEEP_STEPS, "probes": 2, "reorth": "window", "window": 4},
                       # a checkpoint every step: under load an auto interval can skip past step 10, or past the
                       # probe's end (which drops its checkpoint), and then the stop below never comes
                       checkpoint={"every": 1})
    grid = ["--grid", "hvp.eps=1e-3,1e-5"]
    points = [tmp_path / "sweep" / "eps=1e-3", tmp_path / "sweep" / "eps=1e-5"]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "sweep", cfg, *grid], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, text=True)
    deadline = time.monotonic() + 120
    interrupted_at, found = None, None
    while time.monotonic() < deadline and proc.poll() is None:
        found = [_newest_checkpoint(p) for p in points]
        if all(f and f[0] >= 10 for f in found):
            proc.send_signal(signal.SIGINT)
            interrupted_at = time.monotonic()
            break
        time.sleep(0.02)
    if interrupted_at is None:
        finished = proc.poll() is not None
        kill_all({proc.pid, *descendants(proc.pid)})
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"the sweep {'finished' if finished else 'stalled'} before it could be "
                    f"interrupted; checkpoints last seen {found}; stderr ends:\n{err[-2000:]}")
    _, err = proc.communicate(timeout=60)
    assert time.monotonic() - interrupted_at < 30 and proc.returncode == 130
    assert "interrupted by SIGINT" in err
    for p in points:
        info = json.load(open(p / "run.json"))
        assert info["status"] == "interrupted" and info["signal"] == "SIGINT"
        assert _newest_checkpoint(p) is not None

    assert main(["sweep", cfg, *grid]) == 0
    for p in points:
        info = json.load(open(p / "run.json"))
        assert info["status"] == "complete" and info["resumed"]
        assert info["timing"]["hvp_count"] < 2 * SWEEP_STEPS  # the checkpointed steps were not redone
    index = pq.read_table(tmp_path / "sweep" / "sweep.parquet").to_pandas()
    assert (index.status == "complete").all()


def test_auto_checkpoint_interval_keeps_writes_under_five_percent_of_compute():
    from actors.worker import AUTO_CHECKPOINT_COST, CheckpointSchedule

    schedule = CheckpointSchedule("auto")
    assert schedule.due(1) and not CheckpointSchedule(0).due(5)
    # a save that holds the compute 1 s after 0.1 s steps: the next one 200 steps later (1 s per 20 s of compute)
    assert schedule.interval(1.0, [0.1, 0.1]) == 200
    assert 1.0 / (200 * 0.1) <= AUTO_CHECKPOINT_COST
    assert schedule.interval(0.001, [0.5]) == 1  # cheap saves: every step
    schedule.saved(1, 1.0, [0.1, 0.1])
    assert not schedule.due(200) and schedule.due(201)
    every = CheckpointSchedule(3)
    assert not every.due(2) and every.due(3)
    every.saved(3, 0.5, [0.1])
    assert every.due(6) and not every.due(5)


def _files(folder) -> dict[str, tuple[int, int]]:
    return {os.path.relpath(os.path.join(d, n), folder): (os.stat(os.path.join(d, n)).st_size,
                                                           os.stat(os.path.join(d, n)).st_mtime_ns)
            for d, _, names in os.walk(folder) for n in names if not n.startswith(LOCK_NAME)}


def test_a_run_whose_lock_is_taken_over_stops_recording_nothing_and_the_new_holder_completes(tmp_path, capsys,
                                                                                            monkeypatch):
    from pipeline.run import output_lock
    from pipeline.run.config import load_config
    from pipeline.run.driver import preflight, run
    from pipeline.run.scheduler import Scheduler

    model, data = assets(str(tmp_path))
    out = tmp_path / "run"
    cfg = write_config(str(tmp_path / "run.yaml"), model=model, data=data, output_dir=str(out),
                       lanczos={"steps": 12, "probes": 2, "reorth": "window", "window": 4})
    monkeypatch.setattr(output_lock, "HEARTBEAT_SECONDS", 3600.0)  # the first run's heartbeat has stalled
    monkeypatch.setattr(output_lock, "STALE_SECONDS", 0.1)
    real_placed = Scheduler._placed
    taken = {}

    def taken_over_while_loading(self, slot):  # as its group starts loading, another node's run takes over
        time.sleep(2 * output_lock.STALE_SECONDS)  # the first run's lock is stale by then, however fast it got here
        with monkeypatch.context() as m:
            m.setattr(output_lock.socket, "gethostname", lambda: "node-b")
            taken["lock"] = output_lock.OutputLock(str(out)).acquire()
        taken["files"] = _files(out)
        real_placed(self, slot)

    monkeypatch.setattr(Scheduler, "_placed", taken_over_while_loading)
    capsys.readouterr()
    assert main(["run", cfg]) == 1  # its poll loop stops it
    err = capsys.readouterr().err
    assert "LockLost" in err and "taken over by another run" in err and "Traceback" not in err, err
    assert _files(out) == taken["files"]  # nothing written since: no group event, no status
    assert json.load(open(out / "run.json"))["status"] == "running"
    monkeypatch.setattr(Scheduler, "_placed", real_placed)
    try:  # the new holder runs alone, as `run` does under the lock it took over
        info = run(preflight(load_config(cfg)))
    finally:
        taken["lock"].release()
    assert info["status"] == "complete" and json.load(open(out / "run.json"))["status"] == "complete"
    assert pq.read_table(out / "lanczos.parquet").to_pandas().probe_id.unique().tolist() == [0, 1]
    assert not (out / LOCK_NAME).exists()


# a small basis (k + 3): a restart, and so a saved state, every 2 HVPs, and a tight tol: many restarts, and time
# to be killed after the second one
EIGEN_KILLED = {"k": 3, "tol": 1e-10, "basis": 6, "max_hvps": 2000, "landscape": {"points_1d": 0, "points_2d": 0}}


def test_an_eigen_task_killed_after_a_restart_resumes_from_its_state_with_fewer_hvps_to_the_same_pairs(
        tmp_path, shared_ray_address):
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from helpers import make_batches
    from hessian_core import FiniteDifferenceHVP, ParamSpace, latest_eigen_state, thick_restart_lanczos
    from hessian_core.models import ModelSpec, load_model
    from pipeline.run.driver import EIGEN_SEED_OFFSET

    model, data = assets(str(tmp_path))
    out = tmp_path / "run"
    cfg = write_config(str(tmp_path / "run.yaml"), output_dir=str(out), model=model, data=data,
                       lanczos={"probes": 0}, eigen=EIGEN_KILLED, cluster={"address": shared_ray_address})

    def past_restart_2():
        try:
            found = latest_eigen_state(str(out / "checkpoints" / "eigen"))
        except OSError:  # pruned between listing and reading: a newer state is complete
            return None
        return found[1]["restarts"] if found and found[1]["restarts"] >= 2 else None

    killed_at = _sigkill_driver_when(cfg, past_restart_2, poll_seconds=0.01)
    assert killed_at is not None, "the driver finished or stalled before it could be killed mid-solve"
    assert json.load(open(out / "run.json"))["status"] == "running" and not (out / "eigenpairs.parquet").exists()

    assert main(["run", cfg]) == 0
    info = json.load(open(out / "run.json"))
    eigen = info["eigen"]
    assert info["status"] == "complete" and info["resumed_from"]["eigen"]["restarts"] >= killed_at
    assert eigen["resumed_at_restart"] >= killed_at and eigen["all_converged"]
    # this invocation: the solver's HVPs since the state it resumed from, and 2 a pair for the bars; no calibration
    assert info["timing"]["hvp_count"] == eigen["hvps"] - eigen["resumed_at_hvps"] + 2 * 3 < eigen["hvps"] + 2 * 3
    assert not (out / "checkpoints").exists()

    # the same pairs as a solve never interrupted, bit for bit: the solver in this process, on the same model,
    # data, eps and start vector (one rank, as the run's group: the same arithmetic)
    reference_model = load_model(ModelSpec(path=model, dtype="float64"))
    batches = list(make_batches(num_batches=1, batch_size=8, seed=7)[0].reshape(2, 4, -1))
    space = ParamSpace(reference_model)
    op = FiniteDifferenceHVP(reference_model, batches, eps=info["eps"], space=space)
    reference = thick_restart_lanczos(op.matvec, space=space, k=3, which="LA", tol=EIGEN_KILLED["tol"],
                                      max_hvps=EIGEN_KILLED["max_hvps"], basis=EIGEN_KILLED["basis"],
                                      seed=EIGEN_SEED_OFFSET)
    pairs = pq.read_table(out / "eigenpairs.parquet").to_pandas().sort_values("index")
    assert reference.hvps == eigen["hvps"] and reference.restarts == eigen["restarts"]
    assert np.array_equal(pairs.eigenvalue.to_numpy(), reference.eigenvalues)
    assert np.array_equal(pairs.residual.to_numpy(), reference.residuals)
    # and the saved eigenvectors, read back with dcp.load, are the in-memory ones of that solve, bit for bit
    target = {f"eigenvector_{i}": {n: torch.empty_like(p) for n, p in reference_model.named_parameters()}
              for i in range(3)}
    with warnings.catch_warnings():  # that it reads in one process, which it is asked to
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(target, checkpoint_id=str(out / "eigenvectors"), no_dist=True)
    assert all(torch.equal(a, b) for i, u in enumerate(reference.eigenvectors)
               for a, b in zip(u, target[f"eigenvector_{i}"].values()))

    # a run stopped after its eigen task finished does not run it again: straight to the finish, no group
    info["status"] = "interrupted"
    (out / "run.json").write_text(json.dumps(info))
    assert main(["run", cfg]) == 0
    again = json.load(open(out / "run.json"))
    assert again["status"] == "complete" and again["resumed_from"]["eigen"] == "finished"
    assert again["timing"]["hvp_count"] == 0 and again["eigen"] == eigen and not again["groups"]
