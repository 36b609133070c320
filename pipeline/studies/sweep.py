"""``hessian-spectrum sweep CONFIG --grid key=v1,v2 ...``: a family of runs over the Cartesian product of overrides.

Each point of the grid is an ordinary run in its own sub-folder of ``output_dir`` (its ``config.yaml`` beside
its results, so it can be rerun or resumed alone with ``hessian-spectrum run``). Points run concurrently, one
group each, ``cluster.num_groups`` at a time, on one Ray connection. Running the same sweep again skips
finished points and resumes the others from their tables and checkpoints. ``sweep.parquet`` indexes the
points by their override values with each point's status and summary; ``sweep.json`` records the grid.
After the points finish, the sweep is compared (``compare.parquet``, ``compare.png``) against its first point.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ..run.config import ConfigError, RunConfig, first_difference, load_config, results_part
from ..run.output_lock import OutputLock
from ..run.run_folder import RunFolder, RunInfo
from ..run.tables import atomic_text, atomic_write

if TYPE_CHECKING:
    from ..run.ray_groups import GroupPool

INDEX_FILE = "sweep.parquet"
# cluster.num_groups is the sweep's concurrency and cluster.address its one Ray connection: not per point
NOT_GRID_KEYS = ("cluster.num_groups", "cluster.address", "output_dir")


@dataclass
class Point:
    name: str  # sub-folder of the sweep's output_dir
    values: dict[str, str]  # grid key -> value as given on the command line
    config: RunConfig


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``["hvp.eps=1e-3,1e-5", ...]`` -> ``[("hvp.eps", ["1e-3", "1e-5"]), ...]``; refuses malformed specs."""
    if not specs:
        raise ConfigError("sweep needs at least one --grid key=v1,v2,...")
    grid, seen = [], set()
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        values = [v.strip() for v in raw.split(",")] if sep else []
        if not sep or not key or not values or any(not v for v in values):
            raise ConfigError(f"--grid {spec!r}: expected key=v1,v2,... with non-empty values, "
                              f"e.g. --grid hvp.eps=auto,1e-4")
        if key in seen:
            raise ConfigError(f"--grid {key}: given twice; list all its values in one --grid")
        if key in NOT_GRID_KEYS:
            raise ConfigError(f"--grid {key}: cannot vary within a sweep (cluster.num_groups sets how many points "
                              f"run at once; address and output_dir are the sweep's own)")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {key}: repeated value in {raw!r}")
        seen.add(key)
        grid.append((key, values))
    return grid


def point_name(values: dict[str, str]) -> str:
    """A readable, file-system-safe folder name: ``eps=1e-05_num_batches=2``."""
    parts = []
    for key, value in values.items():
        short = key.rsplit(".", 1)[-1]
        parts.append(f"{short}={re.sub(r'[^A-Za-z0-9.+-]', '-', value)}")
    return "_".join(parts)


def plan(config_path: str, overrides: list[str], grid: list[tuple[str, list[str]]], *,
         parallel: int | None = None) -> tuple[RunConfig, list[Point], int]:
    """The base config, every point's validated config, and how many points run at once.

    Every point is validated here, before Ray starts: a bad value fails the whole sweep with the point named.
    """
    base = load_config(config_path, overrides, check=False)
    concurrency = parallel if parallel is not None else base.cluster.num_groups
    if concurrency < 1:
        raise ConfigError(f"--parallel must be >= 1, got {concurrency}")
    keys = [k for k, _ in grid]
    points, names, configs = [], set(), {}
    for combo in itertools.product(*(values for _, values in grid)):
        values = dict(zip(keys, combo))
        name = point_name(values)
        if name in names:
            raise ConfigError(f"--grid values {values} give the folder name {name!r} twice; use distinct values")
        names.add(name)
        point_overrides = list(overrides) + [f"{k}={v}" for k, v in values.items()]
        try:
            config = load_config(config_path, point_overrides)
        except ConfigError as e:
            raise ConfigError(f"sweep point {name}: {e}") from None
        # absolute, so that `run POINT/config.yaml` resumes the point from any working directory
        # log_to: the sweep writes one step per point at its end, the points themselves none
        config = replace(config, cluster=replace(config.cluster, num_groups=1),
                         output_dir=os.path.abspath(os.path.join(base.output_dir, name)), log_to=[])
        same = configs.setdefault(_config_key(config), values)
        if same is not values:  # e.g. lanczos.steps=3,03: two spellings of one value would run twice
            raise ConfigError(f"--grid values {same} and {values} give the same config; list each value once")
        points.append(Point(name, values, config))
    return base, points, concurrency


def _config_key(config: RunConfig) -> str:
    """A point's whole config but its folder, as text: equal for values that parse equal."""
    return json.dumps({k: v for k, v in config.to_dict().items() if k != "output_dir"}, sort_keys=True, default=str)


def _local_ray(config: RunConfig) -> bool:
    return config.cluster.address is None and not os.environ.get("RAY_ADDRESS")


def _share_cores(prepared, concurrency: int) -> None:
    """On a local Ray the points running at once share this machine's cores. Applied at run time, not written
    into the point's config: a resume with another --parallel or on another machine is the same point."""
    cluster = prepared.config.cluster
    if cluster.cpus_per_worker is None and _local_ray(prepared.config):
        prepared.cpus_per_worker = max(1, (os.cpu_count() or 1) // (cluster.num_workers * concurrency))


def _write_point_config(point: Point) -> None:
    os.makedirs(point.config.output_dir, exist_ok=True)
    path = RunFolder(point.config.output_dir).point_config_path
    text = yaml.safe_dump(point.config.to_dict(), sort_keys=False)
    atomic_text(path, text)


def _finished(point: Point) -> RunInfo | None:
    info = _point_info(point)
    same = results_part(info.config if info else {}) == point.config.result_dict()
    return info if info is not None and info.status == "complete" and same else None


def _point_info(point: Point) -> RunInfo | None:
    return RunFolder(point.config.output_dir).read_info()


def _row(point: Point, info: RunInfo | None, error: str | None) -> dict:
    info = info or RunInfo()
    summary = info.summary or {}
    timing = info.timing or {}
    return {"run": point.name, **point.values, "status": "failed" if error else (info.status or "pending"),
            "eps": info.eps, "lambda_max": summary.get("lambda_max"), "lambda_min": summary.get("lambda_min"),
            "trace": summary.get("trace"), "hvp_count": timing.get("hvp_count"),
            "seconds": timing.get("total_seconds"), "error": error or info.error}


INDEX_SCHEMA_FIXED = [("run", pa.string()), ("status", pa.string()), ("eps", pa.float64()),
                      ("lambda_max", pa.float64()), ("lambda_min", pa.float64()), ("trace", pa.float64()),
                      ("hvp_count", pa.int64()), ("seconds", pa.float64()), ("error", pa.string())]


def _write_index(out_dir: str, grid: list[tuple[str, list[str]]], rows: list[dict]) -> None:
    fields = [INDEX_SCHEMA_FIXED[0]] + [(k, pa.string()) for k, _ in grid] + INDEX_SCHEMA_FIXED[1:]
    schema = pa.schema(fields)
    table = pa.Table.from_pylist(rows, schema=schema)
    atomic_write(os.path.join(out_dir, INDEX_FILE), lambda tmp: pq.write_table(table, tmp))


def format_index(rows: list[dict]) -> str:
    head = f"{'run':<34}{'status':>10}{'eps':>11}{'lambda_max':>13}{'lambda_min':>13}{'trace':>13}"
    lines = [head]
    for r in rows:
        def num(x, width):
            return f"{x:>{width}.4g}" if isinstance(x, (int, float)) else f"{'-':>{width}}"
        lines.append(f"{r['run'][:33]:<34}{r['status']:>10}{num(r['eps'], 11)}{num(r['lambda_max'], 13)}"
                     f"{num(r['lambda_min'], 13)}{num(r['trace'], 13)}")
    return "\n".join(lines)


def sweep(config_path: str, overrides: list[str], grid_specs: list[str], *, parallel: int | None = None,
          fresh: bool = False, reference: str | None = None) -> list[dict]:
    """Run (or resume) every point; returns the index rows. Raises RuntimeError if any point failed."""
    grid = parse_grid(grid_specs)
    base, points, concurrency = plan(config_path, overrides, grid, parallel=parallel)
    if reference is not None and reference not in [p.name for p in points]:
        raise ConfigError(f"--reference {reference!r} is not a point of this sweep; points: "
                          f"{', '.join(p.name for p in points)}")
    with OutputLock(base.output_dir, label="sweep folder"), contextlib.ExitStack() as point_locks:
        return _sweep(config_path, overrides, grid, base, points, concurrency, point_locks, fresh=fresh,
                      reference=reference)


def _sweep(config_path, overrides, grid, base, points, concurrency, point_locks, *, fresh, reference) -> list[dict]:
    """The sweep with its folder locked; each point's folder is locked too before it is preflighted."""
    from ..run.progress import log

    out_dir = base.output_dir
    sweep_info = _sweep_record(config_path, overrides, grid, base, points, fresh=fresh)
    # everything that can be refused is refused before Ray starts: paths, data, each point's folder
    rows, todo = _prepare_points(points, concurrency, point_locks, fresh=fresh)
    sweep_info["started_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    RunFolder(out_dir).write_sweep_record(sweep_info)

    def update(point: Point | None = None, row: dict | None = None) -> None:
        if point is not None:
            rows[point.name] = row
        _write_index(out_dir, grid, [rows[p.name] for p in points])

    update()
    log(f"sweep: {len(points)} point(s), {len(points) - len(todo)} already finished, "
        f"{min(concurrency, max(len(todo), 1))} at a time")
    if todo:
        _run_points(todo, concurrency, update, total=len(points), rows=rows)
    result = [rows[p.name] for p in points]
    if base.log_to:
        _log_points(base.log_to, result, out_dir=out_dir)
    return _finish_sweep(result, sweep_info, out_dir=out_dir, reference=reference)


def _log_points(log_to: list[str], result: list[dict], *, out_dir: str) -> None:
    """One step per finished point to the ``log_to`` sinks: the checkpoint's number when every point's name has a
    distinct one (a ``model.path`` sweep over checkpoint-200, checkpoint-400, ...), else the point's index."""
    from ..run.recorder import log_figures
    from .timeseries import steps_of_runs

    done = [r["run"] for r in result if r["status"] == "complete"]
    if not done:
        return
    steps, _ = steps_of_runs(done)
    infos = [RunFolder(os.path.join(out_dir, name)).info().to_dict() for name in done]
    log_figures(log_to, [(int(s), info) for s, info in zip(steps, infos)])


def _sweep_record(config_path, overrides, grid, base, points, *, fresh: bool) -> dict:
    """sweep.json's content; refuses a folder that holds a single run or (without --fresh) another sweep."""
    out_dir = base.output_dir
    if RunFolder(out_dir).has_run() and not fresh:
        raise ConfigError(f"output_dir {out_dir!r} holds a single run; use another output_dir for a sweep")
    os.makedirs(out_dir, exist_ok=True)
    sweep_info = {"config_file": os.path.abspath(config_path), "overrides": list(overrides),
                  "grid": [[k, v] for k, v in grid], "points": [p.name for p in points],
                  "base_config": base.to_dict()}
    previous = None if fresh else RunFolder(out_dir).sweep_record()
    what = None if previous is None else first_difference({k: previous.get(k) for k in ("grid", "base_config")},
                                                           {k: sweep_info[k] for k in ("grid", "base_config")})
    if what:
        raise ConfigError(f"output_dir {out_dir!r} holds a different sweep ({what}); use another output_dir or --fresh")
    return sweep_info


def _prepare_points(points, concurrency: int, point_locks, *, fresh: bool) -> tuple[dict[str, dict], list]:
    """Index rows of every point and the (point, Prepared) pairs still to run, each point's folder locked and
    preflighted (a point's bad input names the point)."""
    from ..run.preflight import preflight

    rows: dict[str, dict] = {}
    todo = []
    for point in points:
        done = None if fresh else _finished(point)
        if done is not None:
            rows[point.name] = _row(point, done, None)
            continue
        point_locks.enter_context(OutputLock(point.config.output_dir, label=f"sweep point {point.name}"))
        try:
            prepared = preflight(point.config, fresh=fresh)
        except ConfigError as e:
            raise ConfigError(f"sweep point {point.name}: {e}") from None
        _share_cores(prepared, concurrency)
        todo.append((point, prepared))
        rows[point.name] = _row(point, None, None)
    return rows, todo


def _run_points(todo, concurrency: int, update, *, total: int, rows: dict[str, dict]) -> None:
    """The unfinished points, ``concurrency`` at a time on one Ray; ``update(point, row)`` as each ends."""
    import ray

    from ..run.ray_connection import connect_ray, stop_ray
    from ..run.ray_groups import GroupPool

    widest = max(p.config.cluster.num_workers * prepared.worker_cpus() for p, prepared in todo)
    started = connect_ray(todo[0][0].config, need_cpus=concurrency * widest)
    try:
        for point, _ in todo:
            _write_point_config(point)
        pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="sweep")
        cancel = threading.Event()
        kept = GroupPool()  # a finished point's groups serve the next points (the cluster keys are the sweep's)
        try:
            _collect_points(pool, todo, cancel, update, total=total, rows=rows, kept=kept)
        except BaseException as err:
            # Ctrl-C or SIGTERM: the running points stop at their next poll, keeping their checkpoints for a
            # resume; Ray is shut down only after them (a thread touching Ray after shutdown kills the process)
            from ..run.progress import log

            cancel.reason = err  # the points record the signal that stopped them
            cancel.set()
            log("sweep: interrupted; stopping the running points (Ctrl-C again to stop at once)"
                if isinstance(err, KeyboardInterrupt) else f"sweep: {type(err).__name__}; stopping the running points")
            pool.shutdown(wait=True, cancel_futures=True)
            kept.close()
            for point, _ in todo:
                info = _point_info(point)
                if info is not None:
                    rows[point.name] = _row(point, info, None)
            update()
            raise
        pool.shutdown()
        kept.close()
        if kept.reused:
            from ..run.progress import log

            log(f"sweep: {kept.reused} group(s) served a later point without restarting their workers")
    finally:
        if started and ray.is_initialized():
            stop_ray()


def _collect_points(pool, todo, cancel, update, *, total: int, rows: dict[str, dict], kept: GroupPool) -> None:
    from ..run.driver import run
    from ..run.progress import log

    futures = {pool.submit(run, prepared, name=point.name, own_ray=False, cancel=cancel, pool=kept): point
               for point, prepared in todo}
    for future in as_completed(futures):
        point = futures[future]
        error = None
        try:
            future.result()
        except Exception as e:  # noqa: BLE001 - one failed point does not stop the others
            error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
            log(f"sweep point {point.name} failed: {error}")
        update(point, _row(point, _point_info(point), error))
        log(f"sweep: {sum(r['status'] == 'complete' for r in rows.values())}/{total} complete")


def _finish_sweep(result: list[dict], sweep_info: dict, *, out_dir: str, reference: str | None) -> list[dict]:
    """Print the index, record the end in sweep.json and compare the points that have a spectrum."""
    from ..run.progress import log

    print(format_index(result))
    failed = [r["run"] for r in result if r["status"] != "complete"]
    sweep_info["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    sweep_info["failed"] = failed
    RunFolder(out_dir).write_sweep_record(sweep_info)
    # points without SLQ (lanczos.probes: 0, block studies) have no spectrum to compare
    with_spectrum = [r["run"] for r in result
                     if r["status"] == "complete" and RunFolder(out_dir).point(r["run"]).has_spectrum()]
    if with_spectrum:
        from .compare import compare

        if reference is not None and reference not in with_spectrum:
            log(f"sweep: the reference point {reference} has no finished spectrum; comparing against "
                f"{with_spectrum[0]}")
        compare([os.path.join(out_dir, n) for n in with_spectrum], out_dir=out_dir,
                reference=reference if reference in with_spectrum else None)
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(result)} sweep point(s) failed: {', '.join(failed)}; "
                           f"run the same command again to resume them")
    print(f"sweep results in {out_dir}")
    return result
