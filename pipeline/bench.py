"""``hessian-spectrum bench``: the cost of an HVP against a gradient, and end-to-end SLQ against the peers.

In one run: (1) kernel timings and peak memory inside one group of the config's layout (gradient, FD HVP
central and Richardson, exact HVP where it can run, Lanczos vector work per reorthogonalization mode);
(2) end-to-end SLQ wall time, Ray start-up included, for the layouts 1x1, 1x2 and 2x1 (groups x workers);
(3) the same SLQ with hessian-eigenthings (finite-difference and autograd HVPs) in one process, when it is
installed. Writes bench.json and bench.parquet to the output folder and prints a table.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time

import pyarrow as pa

from .config import RunConfig
from .driver import run
from .preflight import model_spec, preflight
from .progress import log
from .ray_connection import one_group
from .tables import atomic_write, write_json

LAYOUTS = ((1, 1), (1, 2), (2, 1))


def _kernels(prepared, *, eps: float, repeats: int) -> list[dict]:
    config = prepared.config
    from actors.group import rank0

    with one_group(prepared) as (group, _):
        if eps <= 0:
            eps = rank0(group.calibrate(_probe_zero(prepared), fixed_eps=None)).eps
        rows = rank0(group.benchmark(eps=eps, repeats=repeats, window=config.lanczos.window,
                                     vector_dtype=config.lanczos.vector_dtype))
    return [{**r, "workers": config.cluster.num_workers, "eps": eps} for r in rows]


def _probe_zero(prepared):
    from actors.records import ProbeTask

    lz = prepared.config.lanczos
    return ProbeTask(probe_id=0, seed=lz.seed, eps=0.0, scheme="central", steps=lz.steps, reorth=lz.reorth,
                     window=lz.window, vector_dtype=lz.vector_dtype, checkpoint_dir=None, checkpoint_every=0)


def _end_to_end(config: RunConfig, *, eps: float, out_dir: str) -> list[dict]:
    rows = []
    for groups, workers in LAYOUTS:
        if config.data.batch_size % workers:
            continue
        cfg = dataclasses.replace(
            config, output_dir=os.path.join(out_dir, f"slq-{groups}x{workers}"),
            cluster=dataclasses.replace(config.cluster, num_groups=groups, num_workers=workers),
            # the peers do SLQ at a given eps and nothing else: so does this run (no assessment of the eps)
            hvp=dataclasses.replace(config.hvp, eps=eps, assess=False),
            blocks=dataclasses.replace(config.blocks, enabled=False))
        started = time.perf_counter()
        info = run(preflight(cfg, fresh=True))
        wall = time.perf_counter() - started
        rows.append({"tool": "hessian-spectrum", "layout": f"{groups}x{workers}", "seconds": wall,
                     "hvps": info["timing"]["hvp_count"], "lambda_max": info["summary"]["lambda_max"]})
    return rows


def _eigenthings(prepared, *, eps: float) -> list[dict]:
    try:
        import hessian_eigenthings as he
    except ImportError:
        log("hessian-eigenthings is not installed (pip install hessian-eigenthings): no peer comparison")
        return []
    import torch

    from actors.model_loading import load_model
    from hessian_core import causal_lm_loss

    config = prepared.config
    rows = []
    for method in ("finite_difference", "autograd"):
        started = time.perf_counter()
        model = load_model(model_spec(prepared))
        batches = [b for b in prepared.batches]
        op = he.HessianOperator(model, batches, lambda m, b: causal_lm_loss(m, b), method=method,
                                fd_eps=eps if method == "finite_difference" else None)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
            result = he.spectral_density(op, num_runs=config.lanczos.probes, lanczos_steps=config.lanczos.steps,
                                         seed=0)
        wall = time.perf_counter() - started
        top = float(result.raw_eigenvalues.max())
        rows.append({"tool": f"hessian-eigenthings ({method})", "layout": "1 process", "seconds": wall,
                     "hvps": config.lanczos.probes * config.lanczos.steps, "lambda_max": top})
    return rows


def bench(config: RunConfig, *, repeats: int = 5, out_dir: str | None = None) -> dict:
    out_dir = out_dir or os.path.join(config.output_dir, "bench")
    os.makedirs(out_dir, exist_ok=True)
    prepared = preflight(dataclasses.replace(config, output_dir=os.path.join(out_dir, "probe-check")), fresh=True)
    eps = float(config.hvp.eps) if config.hvp.eps != "auto" else 0.0
    log(f"kernels on 1 group x {config.cluster.num_workers} worker(s), {repeats} repeats")
    kernels = _kernels(prepared, eps=eps, repeats=repeats)
    eps = kernels[0]["eps"]
    log(f"end-to-end SLQ: {config.lanczos.probes} probes x {config.lanczos.steps} steps, eps={eps:.3g}")
    slq = _end_to_end(config, eps=eps, out_dir=out_dir)
    slq += _eigenthings(prepared, eps=eps)
    base = next((r for r in slq if r["layout"] == "1x1"), None)
    for r in slq:
        r["throughput_vs_1x1"] = base["seconds"] / r["seconds"] if base else float("nan")
    import ray
    import torch
    import transformers

    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__, "transformers": transformers.__version__,
                          "ray": ray.__version__,
                          "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
              "date": time.strftime("%Y-%m-%d %H:%M:%S"), "config": config.to_dict(), "kernels": kernels, "slq": slq}
    write_json(os.path.join(out_dir, "bench.json"), result)
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != "note"} for r in kernels])
    import pyarrow.parquet as pq

    atomic_write(os.path.join(out_dir, "bench.parquet"), lambda tmp: pq.write_table(table, tmp))
    print(format_bench(result))
    return result


def format_bench(result: dict) -> str:
    lines = [f"{'kernel':<26}{'seconds':>10}{'x gradient':>12}{'peak MiB':>10}{'peak - grad MiB':>17}"]
    for r in result["kernels"]:
        lines.append(f"{r['kernel']:<26}{r['seconds']:>10.4f}{r['ratio_to_gradient']:>12.2f}{r['peak_mib']:>10.1f}"
                     f"{r['peak_over_gradient_mib']:>17.1f}")
    lines.append("")
    lines.append(f"{'end-to-end SLQ':<36}{'layout':>10}{'seconds':>10}{'HVPs':>7}{'speed vs 1x1':>14}{'lambda_max':>12}")
    for r in result["slq"]:
        lines.append(f"{r['tool']:<36}{r['layout']:>10}{r['seconds']:>10.2f}{r['hvps']:>7}"
                     f"{r['throughput_vs_1x1']:>14.2f}{r['lambda_max']:>12.5g}")
    return "\n".join(lines)


__all__ = ["bench", "format_bench"]
