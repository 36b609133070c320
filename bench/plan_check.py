"""``plan``'s per-rank peak against the measured one on CPU: RSS growth over the baseline of each rank.

    python bench/plan_check.py CONFIG [--set KEY=VALUE ...]

``lanczos.vectors`` and ``hvp.restore`` (``--set lanczos.vectors=host --set hvp.restore=host``) place the
window and the restore copy as a run would; ``auto`` is resolved as ``plan`` resolves it for this machine.

Spawns the config's ``cluster.num_workers`` ranks (torch.multiprocessing, gloo, no Ray). Each rank reads its
RSS after the imports and one tiny forward/backward of the architecture (the baseline), then does what a run does on a group: actors.worker.Worker.setup
(load, shard, mixed precision, checkpointing), eps calibration, and one probe of ``lanczos.steps`` steps
(random token ids as data); it then reads its peak RSS (VmHWM). Prints, per rank, the measured growth, the
plan's peak and their ratio, as one JSON line.

glibc keeps freed blocks below its (dynamic, up to 32 MiB) mmap threshold in the heap, so RSS also holds
allocator slack that the plan does not model; BENCHMARKS.md gives figures with the default allocator and
with MALLOC_MMAP_THRESHOLD_=1048576 (blocks of 1 MiB and more go back to the OS when freed).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rss(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024.0
    return float("nan")


def _warm_up(overrides: dict) -> None:
    """Import the model's code and run one tiny forward and backward of its architecture, so that the baseline
    holds the libraries and kernels a rank loads once, and the growth is what the run itself holds."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tiny = {**overrides, "vocab_size": 16, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 1, "intermediate_size": 16}
    cfg = AutoConfig.for_model(tiny.pop("model_type"), **tiny)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    model(input_ids=torch.zeros(1, 8, dtype=torch.long)).logits.sum().backward()
    del model


def rank_main(rank: int, world: int, port: int, config_path: str, overrides: list[str], out: str,
              placement: tuple[str, str] = ("device", "device")) -> None:
    import torch

    from actors.records import CalibrationTask, Placement, ProbeTask
    from actors.worker import Worker
    from hessian_core.models import ModelSpec
    from pipeline.run.config import load_config

    config = load_config(config_path, overrides)
    m, d, lz = config.model, config.data, config.lanczos
    vocab = (m.config or {}).get("vocab_size", 256)
    g = torch.Generator().manual_seed(0)
    batches = torch.randint(0, vocab, (d.num_batches, d.batch_size, d.seq_len), generator=g)
    torch.set_num_threads(1)
    _warm_up(m.config or {})
    baseline = _rss("VmRSS")
    worker = Worker(rank=rank, world_size=world, use_gpu=False)
    spec = ModelSpec(path=m.path, init=m.init, dtype=m.dtype, attn_implementation=m.attn_implementation,
                     config_overrides=m.config or {}, seed=m.seed, compute_dtype=m.compute_dtype,
                     activation_checkpointing=m.activation_checkpointing)
    worker.setup(index=0, rendezvous=("127.0.0.1", port) if world > 1 else None, spec=spec, batches=batches,
                 timeout_seconds=300)
    loaded = _rss("VmHWM") - baseline

    def task(eps):
        return ProbeTask(probe_id=0, seed=0, eps=eps, scheme=config.hvp.scheme, steps=lz.steps, reorth=lz.reorth,
                         window=lz.window, vector_dtype=lz.vector_dtype, checkpoint_dir=None, checkpoint_every=0,
                         placement=Placement(vectors=placement[0], restore=placement[1]))

    choice = worker.execute(CalibrationTask(probe=task(1.0), fixed_eps=None))
    worker.execute(task(choice.eps))
    peak = _rss("VmHWM") - baseline
    worker.shutdown()
    with open(f"{out}.{rank}", "w") as f:
        json.dump({"rank": rank, "measured_peak_bytes": peak, "measured_after_loading_bytes": loaded}, f)


def main(argv: list[str]) -> None:
    import tempfile

    import torch.multiprocessing as mp

    from actors.worker import free_port
    from pipeline.run.config import load_config
    from pipeline.run.plan import default_device_bytes, placement_line, plan_run

    config_path, overrides = argv[0], [a for a in argv[1:] if a != "--set"]
    config = load_config(config_path, overrides)
    plan = plan_run(config, device_bytes=default_device_bytes(config))
    placement = (plan.config.lanczos.vectors, plan.config.hvp.restore)
    world = config.cluster.num_workers
    out = os.path.join(tempfile.mkdtemp(), "rank")
    mp.spawn(rank_main, args=(world, free_port(), config_path, overrides, out, placement), nprocs=world, join=True)
    ranks = []
    for r in range(world):
        with open(f"{out}.{r}") as f:
            ranks.append(json.load(f))
    result = {"config": config_path, "overrides": overrides, "num_params": plan.shape.num_params,
              "plan_peak_bytes": plan.peak, "plan_total_bytes": plan.total, "plan_loading_bytes": plan.loading,
              "placement": placement_line(plan), "plan_rows": plan.rows, "plan_host_rows": plan.host_rows,
              "ranks": ranks,
              "ratio_measured_over_plan": [r["measured_peak_bytes"] / plan.peak for r in ranks]}
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
