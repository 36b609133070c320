"""Result tables (Arrow schemas, Parquet with the run's config in the schema metadata) and atomic file writes.

Every file is written to a temporary name in the same folder and renamed into place, so a crash never
leaves a truncated file under a final name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable

import pyarrow as pa
import pyarrow.parquet as pq

LANCZOS_SCHEMA = pa.schema([("probe_id", pa.int32()), ("step", pa.int32()), ("alpha", pa.float64()),
                            ("beta", pa.float64())])
RITZ_SCHEMA = pa.schema([("probe_id", pa.int32()), ("value", pa.float64()), ("weight", pa.float64()),
                         ("residual", pa.float64())])
DENSITY_SCHEMA = pa.schema([("value", pa.float64()), ("density", pa.float64())])
BLOCKS_SCHEMA = pa.schema([("probe_id", pa.int32()), ("block", pa.string()), ("rel_error", pa.float64()),
                           ("cosine", pa.float64()), ("whole_rel_error", pa.float64())])
CONFIG_METADATA_KEY = b"hessian_spectrum.config"


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename tmp_path to ``path`` (atomic on one filesystem)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results unreadable to the rest of a team
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Atomically write a text file (UTF-8)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


def write_json(path: str, obj: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def write_table(path: str, columns: dict, *, schema: pa.Schema, config_json: str) -> None:
    table = pa.table(columns, schema=schema.with_metadata({CONFIG_METADATA_KEY: config_json.encode()}))
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_table(path: str) -> pa.Table:
    return pq.read_table(path)


def table_config(path: str) -> dict:
    return json.loads(pq.read_schema(path).metadata[CONFIG_METADATA_KEY])
