"""One analysis run: preflight checks, Ray groups, eps, SLQ and block probes in parallel, tables, plots, run.json."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hessian_core import (SpectralMeasure, extreme_eigenvalues, latest_complete_step, ritz_rule, smoothed_density,
                          trace_estimate)
from hessian_core.quadrature import SIGMA_FRACTION

from . import demo
from .config import ConfigError, RunConfig
from .data import analysis_batches, load_sequences, looks_local
from .tables import (BLOCKS_SCHEMA, DENSITY_SCHEMA, LANCZOS_SCHEMA, RITZ_SCHEMA, read_table, write_json,
                     write_table)

OUTPUT_FILES = ("run.json", "lanczos.parquet", "ritz.parquet", "density.parquet", "blocks.parquet",
                "density.png", "blocks.png")
CHECKPOINTS = "checkpoints"
BLOCK_SEED_OFFSET = 1_000_003  # block probes are Gaussian and drawn from their own seed stream


@dataclass
class Prepared:
    config: RunConfig
    model_path: str | None
    batches: torch.Tensor  # [num_batches, batch_size, seq_len]
    # cores (torch threads) per rank when a sweep shares a local Ray's cores among its points; None: the config's
    cpus_per_worker: int | None = None

    def worker_cpus(self) -> int:
        return self.cpus_per_worker or self.config.cpus_per_worker()


_log_context = threading.local()  # a sweep runs several runs in threads; each names itself in its log lines


def log(msg: str) -> None:
    name = getattr(_log_context, "run_name", None)
    tag = f"hessian-spectrum {name}" if name else "hessian-spectrum"
    print(f"[{tag}] {msg}", file=sys.stderr, flush=True)


def _check_output_dir(config: RunConfig, *, fresh: bool) -> None:
    out = config.output_dir
    try:
        os.makedirs(out, exist_ok=True)
        probe = os.path.join(out, ".write-test")
        with open(probe, "w") as f:
            f.write("ok")
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"output_dir {out!r} cannot be written: {e.strerror or e}") from None
    for name in os.listdir(out):  # temporaries of writes that a crash interrupted
        if name.startswith(".") and name.endswith(".tmp"):
            os.unlink(os.path.join(out, name))
    if os.path.exists(os.path.join(out, "sweep.json")) and not fresh:
        raise ConfigError(f"output_dir {out!r} holds a sweep; use another output_dir for a single run")
    existing = os.path.join(out, "run.json")
    if os.path.exists(existing) and not fresh:
        try:
            with open(existing) as f:
                previous = json.load(f).get("config")
        except (OSError, ValueError):
            previous = None
        if previous != config.to_dict():
            raise ConfigError(f"output_dir {out!r} holds a run with a different config; use another output_dir "
                              f"or pass --fresh to replace it")
    if fresh:
        for name in OUTPUT_FILES:
            path = os.path.join(out, name)
            if os.path.exists(path):
                os.unlink(path)
        shutil.rmtree(os.path.join(out, CHECKPOINTS), ignore_errors=True)


def preflight(config: RunConfig, *, fresh: bool = False) -> Prepared:
    """Everything that can be refused before Ray starts or a model is loaded: paths, data, sizes, vocab."""
    model_path = config.model.path
    data_path = config.data.path
    if model_path == demo.DEMO or data_path == demo.DEMO:
        demo_model, demo_data = demo.ensure_demo(log)
        model_path = demo_model if model_path == demo.DEMO else model_path
        data_path = demo_data if data_path == demo.DEMO else data_path
    if model_path and looks_local(model_path):
        if not os.path.isdir(model_path):
            raise ConfigError(f"model.path {model_path!r} does not exist (expected a local model folder or hub id)")
        if not os.path.exists(os.path.join(model_path, "config.json")):
            raise ConfigError(f"model.path {model_path!r} has no config.json; it is not a Hugging Face model folder")
        from actors.model_loading import WEIGHT_FILES, has_weights

        if config.model.init == "pretrained" and not has_weights(model_path):
            raise ConfigError(f"model.path {model_path!r} has no weights ({', '.join(WEIGHT_FILES)}); "
                              f"set model.init=random to analyse random weights")
    data = config.data
    if data_path != data.path:
        from dataclasses import replace

        data = replace(data, path=data_path)
    sequences = load_sequences(data, tokenizer_path=model_path, revision=config.model.revision)
    batches = analysis_batches(sequences, data)
    vocab = _vocab_size(config, model_path)
    if vocab is not None and int(batches.max()) >= vocab:
        raise ConfigError(f"data.path {data.path!r} has token id {int(batches.max())} but the model's vocab_size is "
                          f"{vocab}; the data was tokenized for another model")
    _check_address(config.cluster.address)
    _check_output_dir(config, fresh=fresh)
    return Prepared(config, model_path, batches)


def _vocab_size(config: RunConfig, model_path: str | None) -> int | None:
    if model_path:
        from transformers import AutoConfig

        try:
            return getattr(AutoConfig.from_pretrained(model_path, revision=config.model.revision), "vocab_size", None)
        except Exception:  # a hub id unreachable offline: the ranks will report it when loading
            return None
    return (config.model.config or {}).get("vocab_size")


def _check_address(address: str | None) -> None:
    """Refuse a ray://host:port or host:port nobody listens on within seconds (Ray itself retries for long)."""
    if address is None or address == "auto":
        return
    target = address[len("ray://"):] if address.startswith("ray://") else address
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host or target, int(port) if host else 10001), timeout=10).close()
    except (OSError, ValueError) as e:
        raise ConfigError(f"cluster.address {address!r} is unreachable ({e}); use null for a local Ray, 'auto', "
                          f"host:port of a running head node, or ray://host:port of its client server") from None


def _connect_ray(config: RunConfig, *, need_cpus: int | None = None) -> None:
    import ray

    address = config.cluster.address
    if address is None and not os.environ.get("RAY_ADDRESS"):
        need = need_cpus or config.cluster.num_workers * config.cluster.num_groups * config.cpus_per_worker()
        ray.init(num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, logging_level="ERROR",
                 configure_logging=True)
        return
    try:
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), logging_level="ERROR")
    except (ConnectionError, RuntimeError) as e:
        raise ConfigError(f"cluster.address {address!r}: cannot join a Ray cluster ({str(e).splitlines()[0]})") from None


class Progress:
    """A tqdm bar over all HVP steps on a terminal; plain log lines otherwise."""

    def __init__(self, total: int, *, bar: bool = True):
        self.total, self.done, self.last_line = total, 0, 0.0
        self.bar = None
        if bar and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="hvp", desc="probes", file=sys.stderr)

    def update(self, info: dict) -> None:
        self.done += 1
        text = f"probe {info['probe_id']} step {info['step']}/{info['steps']}"
        if info.get("hvp_seconds") is not None:
            text += f" | last HVP {info['hvp_seconds']:.3f}s"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
            self.bar.update(1)
        elif time.monotonic() - self.last_line > 5 or info["step"] == info["steps"]:
            self.last_line = time.monotonic()
            log(f"{self.done}/{self.total} HVP steps | {text}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _versions() -> dict:
    import ray
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "ray": ray.__version__}


class Run:
    """State of one invocation; tables are rewritten after every finished probe so a crash loses nothing."""

    def __init__(self, prepared: Prepared):
        self.prepared = prepared
        self.config = prepared.config
        self.out = self.config.output_dir
        self.config_json = self.config.to_json()
        self.started = time.time()
        self.info: dict[str, Any] = {"status": "running", "config": self.config.to_dict(), "resumed": False,
                                     "versions": _versions(), "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.probes: dict[int, dict] = {}
        self.block_probes: dict[int, dict] = {}
        self.hvp_seconds: list[float] = []
        self.step_seconds: list[float] = []
        self.checkpoint_seconds = 0.0
        self.hvp_count = 0
        self.previous: dict = {}
        self._load_previous()

    def path(self, name: str) -> str:
        return os.path.join(self.out, name)

    def checkpoint_dir(self, probe_id: int) -> str:
        return os.path.abspath(self.path(os.path.join(CHECKPOINTS, f"probe-{probe_id:05d}")))

    def _load_previous(self) -> None:
        """What an earlier invocation on this output_dir (same config, checked in preflight) finished."""
        if os.path.exists(self.path("run.json")):
            with open(self.path("run.json")) as f:
                self.previous = json.load(f)
        if os.path.exists(self.path("lanczos.parquet")):
            df = read_table(self.path("lanczos.parquet")).to_pandas().sort_values(["probe_id", "step"])
            for pid, rows in df.groupby("probe_id"):
                self.probes[int(pid)] = {"probe_id": int(pid), "alphas": rows.alpha.tolist(),
                                         "betas": rows.beta.tolist(), "hvp_seconds": [], "step_seconds": []}
        if os.path.exists(self.path("blocks.parquet")):
            df = read_table(self.path("blocks.parquet")).to_pandas()
            for pid, rows in df.groupby("probe_id", sort=True):
                self.block_probes[int(pid)] = {"probe_id": int(pid), "blocks": rows.block.tolist(),
                                               "rel_error": rows.rel_error.tolist(), "cosine": rows.cosine.tolist(),
                                               "whole_rel_error": float(rows.whole_rel_error.iloc[0])}
        checkpoints = {}
        for pid in range(self.config.lanczos.probes):
            found = latest_complete_step(self.checkpoint_dir(pid))
            if found is not None and pid not in self.probes:
                checkpoints[pid] = found[0]
        if self.probes or self.block_probes or checkpoints:
            self.info["resumed"] = True
            self.info["resumed_from"] = {"finished_probes": sorted(self.probes),
                                         "finished_block_probes": sorted(self.block_probes),
                                         "checkpoint_steps": {str(k): v for k, v in checkpoints.items()}}

    def save_info(self) -> None:
        self.info["timing"] = {
            "grad_seconds": self.info.get("timing", {}).get("grad_seconds"),
            "hvp_seconds": statistics.median(self.hvp_seconds) if self.hvp_seconds else None,
            "lanczos_step_seconds": statistics.median(self.step_seconds) if self.step_seconds else None,
            "checkpoint_seconds": self.checkpoint_seconds,
            "hvp_count": self.hvp_count,
            "total_seconds": time.time() - self.started,
        }
        write_json(self.path("run.json"), self.info)

    def add_probe(self, result: dict) -> None:
        self.probes[result["probe_id"]] = result
        self.hvp_seconds += result["hvp_seconds"]
        self.step_seconds += result["step_seconds"]
        self.checkpoint_seconds += sum(result.get("checkpoint_seconds", []))
        self.hvp_count += len(result["hvp_seconds"])
        self.write_lanczos_tables()
        # the probe is now final rows of the tables: its checkpoint is no longer needed
        shutil.rmtree(self.checkpoint_dir(result["probe_id"]), ignore_errors=True)

    def add_block_probe(self, result: dict) -> None:
        self.block_probes[result["probe_id"]] = result
        self.hvp_count += result["hvp_count"]
        self.write_block_table()

    def write_lanczos_tables(self) -> None:
        ids = sorted(self.probes)
        cols = {"probe_id": [], "step": [], "alpha": [], "beta": []}
        ritz = {"probe_id": [], "value": [], "weight": [], "residual": []}
        for pid in ids:
            res = self.probes[pid]
            n = len(res["alphas"])
            cols["probe_id"] += [pid] * n
            cols["step"] += list(range(n))
            cols["alpha"] += res["alphas"]
            cols["beta"] += res["betas"]
            rule = ritz_rule(res["alphas"], res["betas"])
            ritz["probe_id"] += [pid] * len(rule.values)
            ritz["value"] += rule.values.tolist()
            ritz["weight"] += rule.weights.tolist()
            ritz["residual"] += rule.residuals.tolist()
        write_table(self.path("lanczos.parquet"), cols, schema=LANCZOS_SCHEMA, config_json=self.config_json)
        write_table(self.path("ritz.parquet"), ritz, schema=RITZ_SCHEMA, config_json=self.config_json)

    def write_block_table(self) -> None:
        cols = {"probe_id": [], "block": [], "rel_error": [], "cosine": [], "whole_rel_error": []}
        for pid in sorted(self.block_probes):
            res = self.block_probes[pid]
            n = len(res["blocks"])
            cols["probe_id"] += [pid] * n
            cols["block"] += res["blocks"]
            cols["rel_error"] += res["rel_error"]
            cols["cosine"] += res["cosine"]
            cols["whole_rel_error"] += [res["whole_rel_error"]] * n
        write_table(self.path("blocks.parquet"), cols, schema=BLOCKS_SCHEMA, config_json=self.config_json)

    def finish(self) -> None:
        """Summary, density table and plots from what the probes produced."""
        if self.probes:
            rules = [ritz_rule(p["alphas"], p["betas"]) for _, p in sorted(self.probes.items())]
            trace = trace_estimate(rules, dimension=self.info["num_params"])
            ext = extreme_eigenvalues(rules)
            self.info["summary"] = {
                "lambda_max": ext.lambda_max, "lambda_max_residual": ext.lambda_max_residual,
                "lambda_min": ext.lambda_min, "lambda_min_residual": ext.lambda_min_residual,
                "trace": trace.trace, "trace_stderr": None if np.isnan(trace.stderr) else trace.stderr,
                "probes": len(rules),
            }
            if self.config.density.enabled:
                measure = SpectralMeasure.from_rules(rules)
                dens = smoothed_density(measure, grid_size=self.config.density.grid_size)
                self.info["density"] = {"sigma": dens.sigma, "sigma_rule": f"{SIGMA_FRACTION} * (max - min Ritz value)"}
                write_table(self.path("density.parquet"), {"value": dens.grid, "density": dens.density},
                            schema=DENSITY_SCHEMA, config_json=self.config_json)
        if self.block_probes:
            self.info["blocks"] = block_summary(read_table(self.path("blocks.parquet")).to_pandas())
        draw_plots(self.out)


def block_summary(df) -> dict:
    per_block = df.groupby("block", sort=False).agg(rel_error_mean=("rel_error", "mean"),
                                                    rel_error_std=("rel_error", "std"),
                                                    cosine_mean=("cosine", "mean"), cosine_std=("cosine", "std"))
    whole = df.groupby("probe_id")["whole_rel_error"].first()
    return {"overall": {"rel_error_mean": float(df.rel_error.mean()), "rel_error_std": float(df.rel_error.std()),
                        "cosine_mean": float(df.cosine.mean()), "cosine_std": float(df.cosine.std()),
                        "whole_rel_error_mean": float(whole.mean())},
            "per_block": {b: {k: float(v) for k, v in row.items()} for b, row in per_block.iterrows()}}


def draw_plots(run_dir: str) -> list[str]:
    """(Re)draw every plot whose table exists; returns the files written."""
    from .plots import plot_blocks, plot_density

    written = []
    density_path = os.path.join(run_dir, "density.parquet")
    if os.path.exists(density_path):
        dens = read_table(density_path).to_pandas()
        ritz = read_table(os.path.join(run_dir, "ritz.parquet")).to_pandas()
        plot_density(os.path.join(run_dir, "density.png"), grid=dens.value.to_numpy(),
                     density=dens.density.to_numpy(), ritz_values=ritz.value.to_numpy(), title=f"Hessian spectral density ({ritz.probe_id.nunique()} probes)")
        written.append("density.png")
    blocks_path = os.path.join(run_dir, "blocks.parquet")
    if os.path.exists(blocks_path):
        df = read_table(blocks_path).to_pandas()
        names = list(dict.fromkeys(df.block))
        rel = df.pivot(index="probe_id", columns="block", values="rel_error")[names].to_numpy()
        cos = df.pivot(index="probe_id", columns="block", values="cosine")[names].to_numpy()
        plot_blocks(os.path.join(run_dir, "blocks.png"), blocks=names, rel_error=rel, cosine=cos,
                    title="Block-diagonal approximation: per-block error of H v")
        written.append("blocks.png")
    return written


def model_spec(prepared: Prepared):
    """What each rank loads, from the config and the resolved model path."""
    from actors.model_loading import ModelSpec

    m = prepared.config.model
    return ModelSpec(path=prepared.model_path, revision=m.revision, init=m.init, dtype=m.dtype,
                     attn_implementation=m.attn_implementation, config_overrides=m.config or {}, seed=m.seed)


@contextlib.contextmanager
def one_group(prepared: Prepared):
    """A local or joined Ray with one group of the config's ``num_workers`` ranks holding the model, for the
    commands that are not SLQ runs (hvp-error, bench); yields (group, its setup info); tears both down."""
    import ray

    from actors.group import WorkerGroup

    config = prepared.config
    _connect_ray(config)
    group = None
    try:
        group = WorkerGroup(index=0, num_workers=config.cluster.num_workers, use_gpu=config.cluster.use_gpu,
                            cpus_per_worker=prepared.worker_cpus())
        setup = group.setup(spec=model_spec(prepared), batches_ref=ray.put(prepared.batches),
                            timeout_seconds=config.cluster.collective_timeout_seconds)
        yield group, setup
    finally:
        if group is not None:
            group.shutdown()
        ray.shutdown()


def _is_actor_death(err: BaseException) -> bool:
    import ray.exceptions as rex

    if isinstance(err, (rex.RayActorError, rex.ActorDiedError, rex.ActorUnavailableError)):
        return True
    # a surviving rank whose peer died fails inside a collective
    text = str(err).lower()
    return isinstance(err, rex.RayTaskError) and any(k in text for k in ("gloo", "nccl", "connection", "timed out"))


def run(prepared: Prepared, *, name: str | None = None, own_ray: bool = True,
        cancel: threading.Event | None = None) -> dict:
    """Execute a prepared run; returns run.json's content. Raises on failure after recording it.

    ``own_ray=False``: Ray is already connected (a sweep running several runs in threads) and stays so;
    ``name`` then tags this run's log lines; setting ``cancel`` stops the run between two polls (0.5 s), as an
    interruption that keeps its checkpoints.
    """
    import ray
    from ray.util.queue import Queue

    from actors.group import WorkerGroup

    config = prepared.config
    state = Run(prepared)
    state.save_info()
    cl, lz = config.cluster, config.lanczos
    spec = model_spec(prepared)
    groups: list[WorkerGroup] = []
    progress_bar = None
    _log_context.run_name = name
    try:
        if own_ray:
            _connect_ray(config)
        batches_ref = ray.put(prepared.batches)

        def new_group(index: int) -> WorkerGroup:
            group = WorkerGroup(index=index, num_workers=cl.num_workers, use_gpu=cl.use_gpu,
                                cpus_per_worker=prepared.worker_cpus())
            info = group.setup(spec=spec, batches_ref=batches_ref, timeout_seconds=cl.collective_timeout_seconds)
            state.info["num_params"] = info["num_params"]
            state.info.setdefault("groups", {})[str(index)] = info
            return group

        def check_cancel() -> None:
            if cancel is not None and cancel.is_set():
                raise KeyboardInterrupt("the sweep running this run was interrupted")

        log(f"starting {cl.num_groups} group(s) x {cl.num_workers} worker(s)")
        groups = []
        for i in range(cl.num_groups):
            check_cancel()
            groups.append(new_group(i))
        check_cancel()
        log(f"model loaded: {state.info['num_params']:,} parameters")
        if state.info["resumed"] and state.previous.get("eps_calibration"):
            choice = state.previous["eps_calibration"]  # checkpoints were taken with this eps
            log(f"resuming: {len(state.probes)} probe(s) finished, checkpoints at "
                f"{state.info['resumed_from']['checkpoint_steps'] or 'none'}; eps from the earlier run")
        elif not config.hvp.assess:
            eps = float(config.hvp.eps)
            choice = {"eps": eps, "source": "fixed", "relative_error": None, "grad_norm": None,
                      "third_derivative": None, "perturbation_rounding": None, "reliable": None,
                      "message": f"eps={eps:.3g} (fixed, not assessed: hvp.assess is false)"}
        else:
            eps_arg = None if config.hvp.eps == "auto" else float(config.hvp.eps)
            choice = groups[0].run("calibrate", seed=lz.seed, scheme=config.hvp.scheme, eps=eps_arg)
            state.hvp_count += choice.pop("hvp_count")
        state.info["eps"] = choice["eps"]
        state.info["eps_calibration"] = choice
        log(choice["message"])
        if choice["reliable"] is False:
            log("warning: the HVP at this eps is unreliable; results may be dominated by numerical noise")
        # one timed gradient; a warm-up first only where no calibration has just run the model
        warm = choice.get("grad_norm") is not None and not state.info["resumed"]
        check_cancel()
        grad_seconds = groups[0].run("gradient_seconds", repeats=1, warmup=not warm)
        state.info["timing"] = {"grad_seconds": grad_seconds}
        state.save_info()

        tasks = deque([("slq", pid) for pid in range(lz.probes) if pid not in state.probes])
        if config.blocks.enabled:
            tasks += [("blocks", pid) for pid in range(config.blocks.probes) if pid not in state.block_probes]
        done_steps = state.info.get("resumed_from", {}).get("checkpoint_steps", {})
        total_steps = sum(lz.steps - done_steps.get(str(pid), 0) for kind, pid in tasks if kind == "slq")
        queue = Queue(actor_options={"num_cpus": 0})
        progress_bar = Progress(total_steps + sum(1 for kind, _ in tasks if kind == "blocks"), bar=own_ray)

        def progress(info: dict, queue=queue) -> None:
            # fire and forget: a blocking put would hold rank 0 (and so its group) for a round trip every step
            queue.actor.put_nowait.remote(info)

        def submit(group: WorkerGroup, task: tuple[str, int]) -> list:
            kind, pid = task
            if kind == "slq":
                return group.call("run_probe", probe_id=pid, seed=lz.seed, eps=state.info["eps"],
                                  scheme=config.hvp.scheme, steps=lz.steps, reorth=lz.reorth, window=lz.window,
                                  vector_dtype=lz.vector_dtype, checkpoint_dir=state.checkpoint_dir(pid),
                                  checkpoint_every=config.checkpoint.every,
                                  checkpoint_meta={"config": config.digest()}, progress=progress)
            return group.call("run_blocks", probe_id=pid, seed=lz.seed + BLOCK_SEED_OFFSET, eps=state.info["eps"],
                              scheme=config.hvp.scheme)

        free = list(groups)
        inflight: dict[int, tuple[WorkerGroup, tuple[str, int], list]] = {}
        failures = 0
        while tasks or inflight:
            check_cancel()
            if not own_ray and not ray.is_initialized():
                raise RuntimeError("Ray was shut down by the sweep running this run")
            while tasks and free:
                group, task = free.pop(0), tasks.popleft()
                inflight[group.index] = (group, task, submit(group, task))
            all_refs = [r for _, _, refs in inflight.values() for r in refs]
            ray.wait(all_refs, num_returns=1, timeout=0.5)
            pending = queue.qsize()
            for info in queue.get_nowait_batch(pending) if pending else []:  # two round trips, not one per step
                progress_bar.update(info)
            for index, (group, task, refs) in list(inflight.items()):
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                try:
                    for ref in ready:
                        ray.get(ref)
                except Exception as err:  # noqa: BLE001 - classified below
                    del inflight[index]
                    if not _is_actor_death(err) or failures >= cl.max_failures:
                        raise
                    failures += 1
                    log(f"group {index} lost a worker during {task[0]} probe {task[1]} "
                        f"({type(err).__name__}); rebuilding it ({failures}/{cl.max_failures})")
                    group.shutdown()
                    replacement = new_group(index)
                    groups[groups.index(group)] = replacement
                    free.append(replacement)
                    tasks.appendleft(task)
                    continue
                if len(ready) == len(refs):
                    del inflight[index]
                    result = ray.get(refs[0])
                    if task[0] == "slq":
                        state.add_probe(result)
                        resumed = (f", resumed at step {result['resumed_at_step']}" if result["resumed_at_step"]
                                   else "")
                        log(f"probe {task[1]} done: {len(result['alphas'])} steps ({result['stopped']}{resumed})")
                    else:
                        state.add_block_probe(result)
                        progress_bar.update({"probe_id": task[1], "step": 1, "steps": 1, "hvp_seconds": None})
                        log(f"block probe {task[1]} done: whole block-diagonal error {result['whole_rel_error']:.3f}")
                    state.save_info()
                    free.append(group)
        state.info["worker_failures_recovered"] = failures
        shutil.rmtree(state.path(CHECKPOINTS), ignore_errors=True)
        state.finish()
        state.info["status"] = "complete"
        state.info["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        state.save_info()
        return state.info
    except BaseException as err:
        state.info["status"] = "failed"
        state.info["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        try:
            if state.probes or state.block_probes:
                state.finish()
        finally:
            state.save_info()
        raise
    finally:
        if progress_bar is not None:
            progress_bar.close()
        for group in groups:
            if not ray.is_initialized():  # a call now would start a new local Ray (auto-init)
                break
            try:  # interrupted ranks are busy in a probe: kill them rather than queue a shutdown behind it
                group.shutdown(graceful=not (cancel is not None and cancel.is_set()))
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass
        if own_ray and ray.is_initialized():
            ray.shutdown()


__all__ = ["preflight", "run", "draw_plots", "block_summary", "Prepared", "log"]
