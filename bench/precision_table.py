"""The precision table of docs/precision.md: hvp-error's study for one precision, in this process (no Ray).

    python bench/precision_table.py configs/study-eps.yaml float32 bfloat16 runs/precision/mixed

runs exactly what ``hessian-spectrum hvp-error CONFIG --set model.dtype=float32 --set model.compute_dtype=bfloat16``
runs on its one rank (actors.worker.Worker.hvp_errors: the FD HVP over 6 decades of eps and at the auto eps,
against the float64 double-backward HVP), and writes the same hvp_error.json / .parquet / .png into the folder.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402


def main(config_path: str, dtype: str, compute: str, out_dir: str) -> None:
    import torch

    from actors.records import HVPErrorTask
    from actors.worker import Worker
    from pipeline.run.config import load_config
    from pipeline.run.preflight import model_spec, preflight
    from pipeline.studies.hvp_error import SCHEMA, format_hvp_error, parse_eps, plot_hvp_error, summarize
    from pipeline.run.tables import atomic_write, write_json

    compute = None if compute in ("", "none", dtype) else compute
    overrides = [f"model.dtype={dtype}", f"output_dir={out_dir}"] + ([f"model.compute_dtype={compute}"] if compute else [])
    config = load_config(config_path, overrides)
    prepared = preflight(config)
    m = config.model
    spec = model_spec(prepared)
    worker = Worker(rank=0, world_size=1, use_gpu=False, threads=torch.get_num_threads())
    setup = worker.setup(index=0, rendezvous=None, spec=spec, batches=prepared.batches, timeout_seconds=60)
    eps_values = parse_eps(None, m.dtype, m.compute_dtype)
    study = worker.execute(HVPErrorTask(eps_values=eps_values, seed=config.lanczos.seed,
                                        scheme=config.hvp.scheme)).as_dict()
    summary = summarize(study)
    table = pa.table({"eps": study["eps"], "rel_error_exact": study["rel_error_exact"],
                      "rel_error_stable": study["rel_error_stable"], "predicted_rel_error": study["predicted"],
                      "perturbation_rounding": study["perturbation_rounding"]}, schema=SCHEMA)
    atomic_write(os.path.join(out_dir, "hvp_error.parquet"), lambda tmp: pq.write_table(table, tmp))
    write_json(os.path.join(out_dir, "hvp_error.json"),
               {"status": "complete", "kind": "hvp-error", "config": config.to_dict(), "num_params": setup.num_params,
                "scheme": config.hvp.scheme, "summary": summary, "auto": study["auto"],
                "auto_rel_error_exact": study["auto_rel_error_exact"],
                "auto_rel_error_stable": study["auto_rel_error_stable"],
                "exact_unavailable": study["exact_unavailable"]})
    plot_hvp_error(os.path.join(out_dir, "hvp_error.png"), study, summary)
    print(format_hvp_error(study, summary))
    print(f"auto eps {study['auto']['eps']:.3g}: error vs exact {study['auto_rel_error_exact']:.3g} "
          f"({study['auto']['message']})")
    worker.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:5])
