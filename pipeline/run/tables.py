"""Result tables (Arrow schemas, Parquet with the run's config in the schema metadata) and atomic file writes.

Every file is written to a temporary name in the same folder and renamed into place, so a crash never
leaves a truncated file under a final name; and never into a folder whose lock this process held and another
process took over (``LockLost``).
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq

from hessian_core import files

from .config import ConfigError
from .output_lock import ensure_held

LANCZOS_SCHEMA = pa.schema([("probe_id", pa.int32()), ("step", pa.int32()), ("alpha", pa.float64()),
                            ("beta", pa.float64())])
RITZ_SCHEMA = pa.schema([("probe_id", pa.int32()), ("value", pa.float64()), ("weight", pa.float64()),
                         ("residual", pa.float64())])
DENSITY_SCHEMA = pa.schema([("value", pa.float64()), ("density", pa.float64())])
BLOCKS_SCHEMA = pa.schema([("probe_id", pa.int32()), ("block", pa.string()), ("rel_error", pa.float64()),
                           ("cosine", pa.float64()), ("whole_rel_error", pa.float64())])
# the Hutch++ trace task (trace.estimator: hutchpp), written whole once: the sketch's part (kind "span", the exact
# trace on the sketch's span) and each Hutchinson sample on the rest (kind "sample")
TRACE_SCHEMA = pa.schema([("kind", pa.string()), ("index", pa.int32()), ("value", pa.float64())])
# the approximation study (blocks.approximations): a row per (probe, approximation, block)
APPROXIMATIONS_SCHEMA = pa.schema([("probe_id", pa.int32()), ("approximation", pa.string()), ("block", pa.string()),
                                   ("rel_error", pa.float64()), ("cosine", pa.float64()),
                                   ("whole_rel_error", pa.float64()), ("whole_cosine", pa.float64())])
BLOCK_RITZ_SCHEMA = pa.schema([("block", pa.string()), ("probe_id", pa.int32()), ("value", pa.float64()),
                               ("weight", pa.float64()), ("block_size", pa.int64())])
# the eigen task's tables (pipeline.run.recorder.Recorder.add_eigen), each written whole once
EIGENPAIRS_SCHEMA = pa.schema([("index", pa.int32()), ("eigenvalue", pa.float64()), ("residual", pa.float64()),
                               ("fd_bound", pa.float64()), ("error", pa.float64()), ("converged", pa.bool_()),
                               ("rayleigh_eps", pa.float64()), ("rayleigh_2eps", pa.float64())])
EIGEN_MASS_SCHEMA = pa.schema([("eigenvector", pa.int32()), ("block", pa.string()), ("tensor", pa.string()),
                               ("mass", pa.float64())])
LANDSCAPE_SCHEMA = pa.schema([("slice", pa.string()), ("t1", pa.float64()), ("t2", pa.float64()),
                              ("loss", pa.float64())])
CONFIG_METADATA_KEY = b"hessian_spectrum.config"


def atomic_write(path: str, write, *, sync: bool = False) -> None:
    """``hessian_core.files.atomic_write``, refused where this process's lock on the folder was taken over."""
    ensure_held(path)
    files.atomic_write(path, write, sync=sync)


def atomic_text(path: str, text: str, *, sync: bool = False) -> None:
    ensure_held(path)
    files.atomic_text(path, text, sync=sync)


def writable_folder(folder: str, *, what: str) -> None:
    """Create ``folder`` if needed and write a file in it, or raise ConfigError naming ``what`` (the option or
    key that gave it): an unwritable output is refused before any work, not after it."""
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{what} {folder!r} cannot be written: {e.strerror or e}") from None


def read_json(path: str) -> dict | None:
    """A JSON file's content, or None if it is missing or unreadable (e.g. a run that never started)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def write_json(path: str, obj: dict) -> None:
    atomic_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", sync=True)


def write_table(path: str, columns: dict, *, schema: pa.Schema, config_json: str) -> None:
    table = pa.table(columns, schema=schema.with_metadata({CONFIG_METADATA_KEY: config_json.encode()}))
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def read_table(path: str) -> pa.Table:
    return pq.read_table(path)


