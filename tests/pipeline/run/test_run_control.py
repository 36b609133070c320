"""One run per output_dir (a lock with host, pid and heartbeat), SIGTERM as a cooperative stop, a local Ray that
listens on loopback only, and a complete run that stays final."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from hessian_core import latest_complete_step
from pipeline.run import output_lock
from pipeline.cli import main
from pipeline.run.config import ConfigError
from pipeline.run.output_lock import LOCK_NAME, OutputLock
from pipeline_fixtures import assets, write_config
from proc_tools import alive, descendants, kill_all, listening_sockets

# the in-process runs on the module's Ray; the subprocess runs (whose own local Ray is under test) start theirs
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("shared_ray")]

LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


def _cli(cfg, *extra, stderr=subprocess.DEVNULL):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", cfg, *extra], stdout=subprocess.DEVNULL,
                            stderr=stderr, start_new_session=True, text=True)


def _wait_for(predicate, proc, seconds=120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.poll() is None:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return None


def _lanczos(out):
    return pq.read_table(os.path.join(out, "lanczos.parquet")).to_pandas().sort_values(["probe_id", "step"])


def test_second_run_refused_local_ray_on_loopback_and_complete_is_final(tmp_path, capsys, monkeypatch):
    model, data = assets(str(tmp_path))
    out = str(tmp_path / "run")
    cfg = write_config(str(tmp_path / "run.yaml"), model=model, data=data, output_dir=out,
                       lanczos={"steps": 20, "probes": 2, "reorth": "window", "window": 4})
    first = _cli(cfg)
    tree = set()
    try:
        assert _wait_for(lambda: os.path.exists(os.path.join(out, LOCK_NAME)), first, 60)
        time.sleep(1.0)
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", cfg], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 2 and time.monotonic() - started < 30, second.stderr
        assert f"pid {first.pid} on {socket.gethostname()}" in second.stderr, second.stderr
        # while the first run's probes run, every socket its local Ray listens on is on loopback
        # (either probe's checkpoint: probe 0 may finish, and drop its own, before the wait begins)
        assert _wait_for(lambda: any(latest_complete_step(os.path.join(out, "checkpoints", f"probe-{k:05d}"))
                                     for k in range(2)), first)
        tree = descendants(first.pid)
        sockets = listening_sockets(tree)
        assert len(sockets) >= 3, sockets  # GCS, raylet, workers: the check is not vacuous
        assert {addr for _, addr, _ in sockets} <= LOOPBACK, sockets
        assert first.wait(timeout=300) == 0
    finally:
        kill_all(alive(tree | {first.pid}) if first.poll() is None else set())
    assert not os.path.exists(os.path.join(out, LOCK_NAME))
    concurrent = _lanczos(out)

    # readers work beside a running run (its lock held)
    with OutputLock(out):
        for command in (["show", out], ["plot", out], ["report", out, "--output", str(tmp_path / "r.html")]):
            assert main(command) == 0, command
    # a complete run is final: no Ray, its summary again; --fresh recomputes (a lone run, bitwise the same)
    from pipeline.run import driver, ray_connection

    with monkeypatch.context() as m:
        for module in (ray_connection, driver):  # driver imports it by name
            m.setattr(module, "connect_ray", lambda *a, **k: pytest.fail("Ray used for a complete run"))
        capsys.readouterr()
        assert main(["run", cfg]) == 0
    assert "already holds this run, complete" in capsys.readouterr().out
    assert main(["run", cfg, "--fresh"]) == 0
    lone = _lanczos(out)
    for col in ("alpha", "beta"):
        assert np.array_equal(concurrent[col].to_numpy(), lone[col].to_numpy()), col


def _gone(pids: set[int], seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pids)


def test_kept_groups_serve_the_next_run_of_their_layout_and_by_default_none_are_kept(tmp_path):
    """In a process connected to Ray, ``cluster.keep_groups`` leaves a run's idle group to the next run of the same
    layout (same worker processes, the same numbers); another layout shuts it down first; by default a run's
    workers end with it."""
    model, data = assets(str(tmp_path))

    def run(name: str, **cluster) -> tuple[int, ...]:
        cfg = write_config(str(tmp_path / f"{name}.yaml"), model=model, data=data, output_dir=str(tmp_path / name),
                           lanczos={"steps": 6, "probes": 1}, cluster=cluster)
        assert main(["run", cfg]) == 0
        info = json.load(open(tmp_path / name / "run.json"))
        formed = [tuple(g["pids"]) for g in info["groups"] if g["event"] == "formed"]
        assert len(formed) == 1, info["groups"]
        return formed[0]

    alone = run("alone", keep_groups=False)
    assert _gone(set(alone)), "a run's workers outlived it without cluster.keep_groups"
    kept = run("kept", keep_groups=True)
    assert alive(set(kept)) == set(kept)
    assert run("again", keep_groups=True) == kept
    for col in ("alpha", "beta"):  # the same run in fresh and in reused processes: the same bits
        reference = _lanczos(str(tmp_path / "alone"))[col].to_numpy()
        for name in ("kept", "again"):
            assert np.array_equal(_lanczos(str(tmp_path / name))[col].to_numpy(), reference), (name, col)
    wider = run("wider", keep_groups=True, num_workers=2)
    assert not set(wider) & set(kept) and _gone(set(kept)), "another layout's run left the kept group running"


def test_sigterm_mid_probe_exits_143_cleanly_and_resumes(tmp_path, capsys):
    model, data = assets(str(tmp_path))
    out = str(tmp_path / "run")
    steps = 60
    # a checkpoint every step: with `auto`, a save slowed by a loaded machine can push the next one past the
    # probe's end (a tiny model's step is milliseconds), and there is no step 5 to stop at
    cfg = write_config(str(tmp_path / "run.yaml"), model=model, data=data, output_dir=out,
                       lanczos={"steps": steps, "probes": 2, "reorth": "window", "window": 4}, checkpoint={"every": 1})
    proc = _cli(cfg, stderr=subprocess.PIPE)
    tree = set()
    try:
        reached = _wait_for(lambda: (latest_complete_step(os.path.join(out, "checkpoints", "probe-00000")) or
                                     (0,))[0] >= 5, proc)
        if not reached:
            proc.kill()
            pytest.fail(f"the run finished or stalled before it could be stopped mid-probe (exit "
                        f"{proc.wait(timeout=60)}): {proc.stderr.read()[-3000:]}")
        tree = descendants(proc.pid)
        assert len(tree) >= 3, tree
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 143 and time.monotonic() - sent < 15, (proc.returncode, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines[-1].startswith("hessian-spectrum: interrupted by SIGTERM"), err
        assert "Traceback" not in err and "***" not in err and "SIGABRT" not in err, err
        deadline = time.monotonic() + 10
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(tree), f"processes of the run still alive 10 s after it exited: {alive(tree)}"
    finally:
        kill_all(alive(tree | {proc.pid}))
    info = json.load(open(os.path.join(out, "run.json")))
    assert info["status"] == "interrupted" and info["signal"] == "SIGTERM", info["status"]
    assert not os.path.exists(os.path.join(out, LOCK_NAME))

    assert main(["run", cfg]) == 0
    info = json.load(open(os.path.join(out, "run.json")))
    assert info["status"] == "complete" and info["resumed"]
    assert info["timing"]["hvp_count"] < 2 * steps  # a fresh run does 2 x steps plus its calibration


def _holder(tmp_path, **fields):
    os.makedirs(tmp_path, exist_ok=True)
    holder = {"host": "node-7", "pid": 4242, "token": "x", "started_at": "then", "heartbeat": time.time(),
              "command": "hessian-spectrum run c.yaml", **fields}
    with open(tmp_path / LOCK_NAME, "w") as f:
        json.dump(holder, f)
    return holder


def test_lock_refuses_a_live_holder_and_takes_over_a_stale_one(tmp_path, monkeypatch):
    _holder(tmp_path)  # another node, fresh heartbeat
    with pytest.raises(ConfigError, match="in use by pid 4242 on node-7"):
        OutputLock(str(tmp_path)).acquire()
    _holder(tmp_path, heartbeat=time.time() - output_lock.STALE_SECONDS - 1)  # that node stopped beating
    lock = OutputLock(str(tmp_path)).acquire()
    assert json.load(open(tmp_path / LOCK_NAME))["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _holder(tmp_path, host=socket.gethostname(), pid=int(dead.stdout))  # this host, process gone: stale at once
    with OutputLock(str(tmp_path)):
        pass
    # the holder's heartbeat advances; a lock taken over by another process is noticed as lost
    monkeypatch.setattr(output_lock, "HEARTBEAT_SECONDS", 0.05)
    lock = OutputLock(str(tmp_path)).acquire()
    first = json.load(open(tmp_path / LOCK_NAME))["heartbeat"]
    time.sleep(0.3)
    assert json.load(open(tmp_path / LOCK_NAME))["heartbeat"] > first
    _holder(tmp_path)
    time.sleep(0.3)
    assert lock.lost
    lock.release()
    assert json.load(open(tmp_path / LOCK_NAME))["host"] == "node-7"  # not ours: left alone


def test_run_and_sweep_on_a_locked_folder_exit_2_naming_the_holder(tmp_path, capsys):
    model, data = assets(str(tmp_path))
    out = tmp_path / "run"
    cfg = write_config(str(tmp_path / "run.yaml"), model=model, data=data, output_dir=str(out))
    _holder(out)
    assert main(["run", cfg]) == 2
    assert "in use by pid 4242 on node-7" in capsys.readouterr().err
    assert main(["sweep", cfg, "--grid", "hvp.eps=1e-3,1e-4"]) == 2
    err = capsys.readouterr().err
    assert "sweep folder" in err and "pid 4242 on node-7" in err
