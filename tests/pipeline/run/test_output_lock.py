"""The output_dir lock recovers: an unreadable lock goes stale by its mtime, a full disk at start leaves none,
and a holder whose lock another run took over writes nothing more there. No Ray: the full run is in
test_resume.py."""

import errno
import json
import os
import time

import pytest

from pipeline.run import output_lock
from pipeline.cli import main
from pipeline.run.config import ConfigError
from pipeline.run.output_lock import LOCK_NAME, LockLost, OutputLock
from pipeline.run.tables import LANCZOS_SCHEMA, write_json, write_table
from pipeline_fixtures import write_config


def _age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


@pytest.mark.parametrize("kind", ["empty", "garbage", "directory"])
def test_an_unreadable_lock_is_refused_naming_its_file_until_unchanged_for_the_timeout(tmp_path, kind):
    path = tmp_path / LOCK_NAME
    if kind == "directory":
        path.mkdir()
        (path / "something").write_text("x")
    else:
        path.write_bytes(b"" if kind == "empty" else b"\x00\x17{not json")
    with pytest.raises(ConfigError) as refused:
        OutputLock(str(tmp_path)).acquire()
    message = str(refused.value)
    assert str(path) in message and "unreadable" in message and "pid ?" not in message, message
    _age(path, output_lock.STALE_SECONDS - 5)  # not yet
    with pytest.raises(ConfigError, match="unreadable"):
        OutputLock(str(tmp_path)).acquire()
    _age(path, output_lock.STALE_SECONDS + 1)
    with OutputLock(str(tmp_path)):
        assert json.load(open(path))["pid"] == os.getpid()
        assert os.listdir(tmp_path) == [LOCK_NAME]  # nothing left aside
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("hard_links", [True, False])
def test_a_full_disk_at_start_leaves_no_lock_and_exits_2(tmp_path, monkeypatch, capsys, no_ray, hard_links):
    out = tmp_path / "run"
    cfg = write_config(str(tmp_path / "run.yaml"), model=str(tmp_path / "model"), data=str(tmp_path / "d.parquet"),
                       output_dir=str(out))
    real_write = os.write

    def full(fd, data):
        if LOCK_NAME in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    if not hard_links:  # e.g. vfat: the lock is created in place, and removed again when its write fails
        monkeypatch.setattr(os, "link", lambda *a: (_ for _ in ()).throw(OSError(errno.EPERM, "not permitted")))
    assert main(["run", cfg]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and str(out) in err[0], err
    assert not out.exists()  # no lock, no temporary, and no output_dir it created
    out.mkdir()
    with pytest.raises(ConfigError, match="No space left on device"):
        OutputLock(str(out)).acquire()
    assert os.listdir(out) == []
    monkeypatch.setattr(os, "write", real_write)
    with OutputLock(str(out)):  # the disk has room again: nothing stands in the way
        assert json.load(open(out / LOCK_NAME))["pid"] == os.getpid()


def test_a_taken_over_holder_writes_nothing_more_and_the_new_holder_goes_on(tmp_path, monkeypatch):
    monkeypatch.setattr(output_lock, "STALE_SECONDS", 0.2)
    out = str(tmp_path / "run")
    first = OutputLock(out).acquire()
    write_json(os.path.join(out, "run.json"), {"status": "running", "by": "first"})
    time.sleep(0.5)  # the first holder stalls: its heartbeat (every 5 s) is older than STALE_SECONDS
    with monkeypatch.context() as m:
        m.setattr(output_lock.socket, "gethostname", lambda: "node-b")  # the second run, on another node
        second = OutputLock(out).acquire()
    before = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)}

    # the first holder resumes: its first write stops it, before its heartbeat notices
    with pytest.raises(LockLost, match="taken over by another run"):
        write_json(os.path.join(out, "run.json"), {"status": "failed", "by": "first"})
    with pytest.raises(LockLost):  # and every later one: tables, plots, a sweep's index
        write_table(os.path.join(out, "lanczos.parquet"), {k: [] for k in LANCZOS_SCHEMA.names},
                    schema=LANCZOS_SCHEMA, config_json="{}")
    with pytest.raises(LockLost):  # the run's poll loop calls this
        output_lock.ensure_held(os.path.join(out, "checkpoints"))
    first.release()  # leaves the new holder's lock alone
    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)} == before
    assert json.load(open(os.path.join(out, LOCK_NAME)))["token"] == second.token

    # one process plays both runs here, so the new holder writes once the first one has stopped
    write_json(os.path.join(out, "run.json"), {"status": "complete", "by": "second"})
    assert json.load(open(os.path.join(out, "run.json"))) == {"status": "complete", "by": "second"}
    second.release()
    assert os.listdir(out) == ["run.json"]


def test_the_heartbeat_never_replaces_a_lock_taken_over_meanwhile(tmp_path, monkeypatch):
    """The heartbeat rewrites its own file in place: a holder that stalled between its check and its write
    writes into the file that was moved aside, never over the new holder's lock."""
    lock = OutputLock(str(tmp_path)).acquire()
    path = tmp_path / LOCK_NAME
    real_open = open
    stall = {}

    def stalled_open(file, *args, **kwargs):  # the heartbeat's open; then another run takes over
        f = real_open(file, *args, **kwargs)
        if file == str(path) and not stall:
            stall["taken"] = True
            os.rename(path, str(path) + ".aside")
            path.write_text(json.dumps({"host": "node-b", "pid": 1, "token": "b", "heartbeat": time.time()}))
        return f

    monkeypatch.setattr("builtins.open", stalled_open)
    lock._renew()
    monkeypatch.setattr("builtins.open", real_open)
    assert json.load(open(path))["token"] == "b"
    assert not lock.lost  # this beat wrote into the file moved aside; the next one finds the new holder
    lock._renew()
    assert lock.lost
    with pytest.raises(LockLost, match="node-b"):
        lock.ensure_held()
    lock.release()
    assert json.load(open(path))["token"] == "b"
