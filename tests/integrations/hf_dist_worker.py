"""One rank of a 2-rank (gloo, CPU) transformers.Trainer fine-tune, run with and without HessianSpectrumCallback; rank 0
saves what the test compares (losses, full parameters, log history, whether the model was FSDP2-sharded).

    torchrun --nproc-per-node 2 tests/integrations/hf_dist_worker.py OUT MODE[+MODE...]   (MODE: ddp, fsdp, fsdp2-direct)

``ddp``: the Trainer's own DDP (accelerate's MULTI_CPU). ``fsdp``: the Trainer asked for FSDP2 (fsdp_version 2);
on CPU accelerate 1.x never switches to FSDP (its AcceleratorState makes DistributedType.FSDP only from the
multi-accelerator types, not MULTI_CPU), so this runs DDP too: the test records that, and FSDP2 under the Trainer
is left to a machine with GPUs. ``fsdp2-direct``: the callback on a ``fully_shard`` model in a plain loop (below).
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tests_integrations_helpers import finetune  # noqa: E402

from hessian_core.integrations import HessianSpectrumCallback  # noqa: E402


def fsdp2_direct(out: str) -> None:
    """The callback's FSDP2 path without accelerate: the tiny model sharded with ``fully_shard`` (per layer, then
    the root), a plain AdamW loop of 20 steps calling ``on_step_end`` as the Trainer would (a stub Trainer whose
    ``log`` records), every rank with its own analysis batch; and the same loop without the callback."""
    from types import SimpleNamespace

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from hessian_core import causal_lm_loss, is_sharded, shard_model
    from tests_integrations_helpers import tiny_model, token_rows

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    held = [torch.stack([r["input_ids"] for r in token_rows(4, seed=2)])[rank::world]]
    results = {}
    for name in ("with", "without"):
        model = shard_model(tiny_model(), mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
        logged = []
        cb = HessianSpectrumCallback(every_steps=10, batches=held, probes=1, steps=6, eps=1e-3)
        cb.trainer = SimpleNamespace(log=logged.append)
        # what on_train_begin sets from the Trainer's output_dir (no Trainer, no accelerator here)
        cb.monitor.timeseries = os.path.join(out, name, "hessian_timeseries.parquet")
        state, control = SimpleNamespace(global_step=0), SimpleNamespace(should_log=False)
        torch.manual_seed(0)
        losses = []
        model.train()
        for step in range(20):
            batch = torch.stack([r["input_ids"] for r in token_rows(8, seed=100 + step)])[rank::world]
            loss = causal_lm_loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach().clone())
            state.global_step = step + 1
            if name == "with":
                cb.on_step_end(None, state, control, model=model)
        results[name] = {"losses": torch.stack(losses), "sharded": is_sharded(model), "logged": logged,
                         "params": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}}
    if rank == 0:
        torch.save(results, os.path.join(out, "results.pt"))


def main() -> None:
    out, modes = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    for mode in modes.split("+"):  # several in one torchrun: one process start for all
        folder = os.path.join(out, mode)
        os.makedirs(folder, exist_ok=True)
        fsdp2_direct(folder) if mode == "fsdp2-direct" else trainer_run(folder, mode)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def trainer_run(out: str, mode: str) -> None:
    extra = ({"fsdp": True, "fsdp_config": {"fsdp_version": 2, "reshard_after_forward": True,
                                                    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                                    "transformer_layer_cls_to_wrap": ["GPTNeoXLayer"]}}
             if mode == "fsdp" else {})
    results = {}
    for name, cb in (("with", lambda: HessianSpectrumCallback(every_steps=10, eval_batches=1, probes=1, steps=6,
                                                             eps=1e-3)), ("without", None)):
        run = finetune(os.path.join(out, name), steps=40, callback=cb, extra_args=extra, full_params=True)
        results[name] = {"losses": run.losses, "params": run.params, "log_history": run.log_history,
                         "sharded": run.sharded, "world": torch.distributed.get_world_size()}
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(results, os.path.join(out, "results.pt"))


if __name__ == "__main__":
    main()
