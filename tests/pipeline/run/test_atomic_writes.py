"""A crash while a result file is written never leaves a truncated file under its final name."""

import os
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

import pipeline.run.tables as tables
from pipeline.run.tables import LANCZOS_SCHEMA, write_table


def lanczos_columns(n):
    return {"probe_id": [0] * n, "step": list(range(n)), "alpha": [1.0] * n, "beta": [0.5] * n}


def test_a_failing_parquet_write_keeps_the_previous_file_and_no_temporary(tmp_path, monkeypatch):
    path = str(tmp_path / "lanczos.parquet")
    write_table(path, lanczos_columns(3), schema=LANCZOS_SCHEMA, config_json="{}")

    def crash_midway(table, where):
        with open(where, "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(tables.pq, "write_table", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        write_table(path, lanczos_columns(10), schema=LANCZOS_SCHEMA, config_json="{}")
    assert pq.read_table(path).num_rows == 3
    assert os.listdir(tmp_path) == ["lanczos.parquet"]


WRITER = """
import sys
from pipeline.run.tables import LANCZOS_SCHEMA, write_table
n = 400_000
cols = {"probe_id": [0] * n, "step": list(range(n)), "alpha": [1.0] * n, "beta": [0.5] * n}
print("ready", flush=True)
while True:
    write_table(sys.argv[1], cols, schema=LANCZOS_SCHEMA, config_json="{}")
"""


@pytest.mark.slow
def test_sigkill_during_parquet_writes_leaves_only_complete_files(tmp_path):
    path = tmp_path / "lanczos.parquet"
    for delay in (0.05, 0.13, 0.31, 1.5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if path.exists():
            assert pq.read_table(path).num_rows == 400_000  # never a prefix of the table
    assert path.exists()  # at least one write completed over the four runs (the last gets 1.5 s)
    leftovers = [p for p in os.listdir(tmp_path) if p != "lanczos.parquet"]
    assert all(p.startswith(".lanczos.parquet.") and p.endswith(".tmp") for p in leftovers)

