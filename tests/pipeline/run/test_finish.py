"""The finish phase (summary, density, plots, ``complete``) after the last probe: nothing of a run is lost there.

One child run stages its end (tests/finish_child.py): Ray's shutdown race with a pending replacement group, then
a SIGTERM in the middle of the finish. What it leaves resumes without Ray; a kill at each point of the finish
is taken as a copy of the folder at that point, and each copy resumes to the same summary."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import pipeline.run.recorder as recorder
import pipeline.run.run_folder as run_folder
from pipeline.cli import main
from pipeline.run.output_lock import LOCK_NAME
from pipeline_fixtures import assets, write_config
from proc_tools import alive, descendants, kill_all

pytestmark = pytest.mark.slow  # Ray, subprocess runs or simulated clusters: outside `-m "not slow"`

TESTS = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: finish_child.py
REPO = os.path.dirname(TESTS)
NUM_PARAMS = 1128  # the tiny GPT-NeoX of pipeline_fixtures
ENDED = {"status", "error", "signal", "interrupted_at", "finished_at"}  # how an invocation ended: not inherited


def _child(cfg: str, marker: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, TESTS, os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, os.path.join(TESTS, "finish_child.py"), cfg, "--race",
                             "--pause", "2", marker], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def _stop_in_the_finish(proc: subprocess.Popen, marker: str) -> tuple[int, str]:
    """SIGTERM once the finish holds, 2 s in (Ray is shut down by then, or shutting down beside it)."""
    tree = set()
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and not os.path.exists(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        if proc.poll() is None and os.path.exists(marker):
            tree = descendants(proc.pid)
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        kill_all(alive(tree | ({proc.pid} if proc.poll() is None else set())))
    return proc.returncode, err


def _read(folder) -> dict:
    with open(os.path.join(folder, "run.json")) as f:
        return json.load(f)


def _density(folder):
    return pq.read_table(os.path.join(folder, "density.parquet"))


def _as_killed(folder: str) -> None:
    """run.json as a run killed before its finish leaves it (the issue's reproduction on the demo)."""
    info = _read(folder)
    info["status"] = "running"
    for name in ("summary", "finished_at", "density", "signal", "interrupted_at"):
        info.pop(name, None)
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump(info, f)
    for name in ("density.parquet", "density.png"):
        if os.path.exists(os.path.join(folder, name)):
            os.unlink(os.path.join(folder, name))


def _finish_copied_at_each_point(monkeypatch, cfg: str, out: str, copies: str) -> dict[str, str]:
    """Resume ``out`` (every probe finished) to complete, copying the folder as a kill would leave it after the
    tables, after the density, after the plots and just before ``complete`` is written."""
    taken: dict[str, str] = {}

    def copy(point: str) -> None:
        if point not in taken:
            taken[point] = os.path.join(copies, point)
            shutil.copytree(out, taken[point], ignore=shutil.ignore_patterns(LOCK_NAME))

    finish, write_table, draw_plots, save_info = (recorder.Recorder.finish, run_folder.write_table,
                                                  recorder.draw_plots, recorder.Recorder.save_info)

    def write_then_copy(path, *args, **kwargs):
        write_table(path, *args, **kwargs)
        if path.endswith("density.parquet"):
            copy("density")

    def save_or_copy(self):
        if self.info["status"] == "complete":
            copy("complete")
        save_info(self)

    with monkeypatch.context() as m:
        m.setattr(recorder.Recorder, "finish", lambda self: (copy("tables"), finish(self))[1])
        m.setattr(run_folder, "write_table", write_then_copy)
        m.setattr(recorder, "draw_plots", lambda run_dir: (draw_plots(run_dir), copy("plots"))[0])
        m.setattr(recorder.Recorder, "save_info", save_or_copy)
        assert main(["run", cfg]) == 0
    return taken


def test_the_finish_survives_ray_shutdown_a_sigterm_and_a_kill_at_each_point(tmp_path, monkeypatch, no_ray):
    model, data = assets(str(tmp_path))
    out = str(tmp_path / "run")
    cfg = write_config(str(tmp_path / "run.yaml"), model=model, data=data, output_dir=out,
                       lanczos={"steps": 6, "probes": 2, "reorth": "full", "vector_dtype": "float64"})
    marker = str(tmp_path / "finishing")
    code, err = _stop_in_the_finish(_child(cfg, marker), marker)
    # exit 1 "core worker has already been shutdown": the finish released Ray objects while Ray shut down;
    # -15: SIGTERM's default action was back (Ray's shutdown restores it) when the signal came
    assert code == 143, (code, err[-3000:])
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("hessian-spectrum: interrupted by SIGTERM") and "Traceback" not in err, err[-3000:]
    stopped = _read(out)
    assert stopped["status"] == "interrupted" and stopped["signal"] == "SIGTERM"
    assert stopped["num_params"] == NUM_PARAMS and stopped["summary"]["probes"] == 2  # what it holds is summed up

    # from here on the same command finishes what it left, without Ray (no_ray: a connection fails the test);
    # a finish that fails keeps every key it read
    with monkeypatch.context() as m:
        m.setattr(recorder, "draw_plots", lambda run_dir: 1 / 0)
        assert main(["run", cfg]) == 1
    failed = _read(out)
    assert failed["status"] == "failed" and set(stopped) - ENDED <= set(failed), set(stopped) - set(failed)
    assert failed["summary"] == stopped["summary"] and failed["eps_calibration"] == stopped["eps_calibration"]

    _as_killed(out)  # the reproduction: every table written, run.json still `running`
    copies = _finish_copied_at_each_point(monkeypatch, cfg, out, str(tmp_path / "copies"))
    done = _read(out)
    assert done["status"] == "complete" and done["summary"] == stopped["summary"]
    assert set(stopped) - ENDED <= set(done) and done["num_params"] == NUM_PARAMS
    assert sorted(copies) == ["complete", "density", "plots", "tables"]
    for point, folder in copies.items():
        assert _read(folder)["status"] == "running", point
        assert main(["run", cfg, "--set", f"output_dir={folder}"]) == 0, point
        info = _read(folder)
        assert info["status"] == "complete" and info["summary"] == done["summary"], point
        assert _density(folder).equals(_density(out)) and os.path.exists(os.path.join(folder, "density.png")), point


def test_density_grid_size_is_refused_before_ray(tmp_path, capsys, no_ray):
    cfg = write_config(str(tmp_path / "run.yaml"), model="absent", data="absent", output_dir=str(tmp_path / "run"))
    for value, valid in (("1", ">= 2"), ("100000000", "<= 100000")):
        assert main(["run", cfg, "--set", f"density.grid_size={value}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"density.grid_size must be {valid}, got {value}" in err, err


def test_a_signal_during_ray_shutdown_is_taken_after_it():
    from pipeline.run import signals

    signals.install()
    with pytest.raises(signals.Interrupted) as stop:
        with signals.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)  # the handler would have raised here
            reached = True
    assert reached and stop.value.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is signals._handler
