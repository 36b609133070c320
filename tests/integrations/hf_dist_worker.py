"""One rank of a 2-rank (gloo, CPU) transformers.Trainer fine-tune, run with and without HessianSpectrumCallback; rank 0
saves what the test compares (losses, full parameters, log history, whether the model was FSDP2-sharded).

    torchrun --nproc-per-node 2 tests/integrations/hf_dist_worker.py OUT ddp|fsdp

``ddp``: the Trainer's own DDP (accelerate's MULTI_CPU). ``fsdp``: the Trainer asked for FSDP2 (fsdp_version 2);
on CPU accelerate 1.x never switches to FSDP (its AcceleratorState makes DistributedType.FSDP only from the
multi-accelerator types, not MULTI_CPU), so this runs DDP too: the test records that, and FSDP2 under the Trainer
is left to a machine with GPUs.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tests_integrations_helpers import finetune  # noqa: E402

from hessian_core.integrations import HessianSpectrumCallback  # noqa: E402


def main() -> None:
    out, mode = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
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
    torch.distributed.destroy_process_group() if torch.distributed.is_initialized() else None


if __name__ == "__main__":
    main()
