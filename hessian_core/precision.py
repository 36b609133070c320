"""Mixed precision and activation checkpointing for analysis models.

Master parameters stay in their storage dtype (float32 or float64): the finite-difference perturbation, the
backup/restore and the HVP accumulation all happen there, so a small step eps*v is not rounded away. Forward
and backward run in a lower ``compute_dtype`` through FSDP2's ``MixedPrecisionPolicy``: each block's
parameters are cast to ``compute_dtype`` when FSDP gathers them, and gradients are reduced in float32 and
land on the master shards in the master dtype.

A single rank uses the same mechanism on a 1-rank device mesh rather than ``torch.autocast``: autocast casts
only matmul-like ops and keeps norms and softmax in float32, so a 1-rank group would compute with different
numerics (and show a different eps trade-off) than the sharded groups it stands for. The 1-rank mesh needs a
process group of size 1, which ``single_process_group`` creates when none exists.

Activation checkpointing recomputes each transformer block's forward inside its backward (non-reentrant
``torch.utils.checkpoint``). It is applied per block before ``fully_shard``, by wrapping the block's
``forward`` in place, so parameter names (which seed the probes) and module paths do not change
(``hessian_core.models.parallelize`` applies it to every block, then the policy and FSDP2).
"""

from __future__ import annotations

import functools
import socket

import torch
import torch.distributed as dist
from torch import nn

_CHECKPOINTED = "_hessian_spectrum_checkpointed"


def needs_mixed_precision(master: torch.dtype, compute: torch.dtype | None) -> bool:
    """True when forward/backward should run in a dtype other than the parameters' own."""
    return compute is not None and compute != master


def mixed_precision_policy(master: torch.dtype, compute: torch.dtype | None):
    """FSDP2's policy for (master, compute): params cast to ``compute``, gradients reduced in float32 (or
    float64 for float64 masters); None when no cast is needed."""
    if not needs_mixed_precision(master, compute):
        return None
    if torch.finfo(compute).bits > torch.finfo(master).bits:
        raise ValueError(f"compute dtype {compute} is wider than the master dtype {master}: "
                         f"store the parameters in {compute} instead")
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=torch.promote_types(master, torch.float32))


def checkpoint_module(module: nn.Module) -> nn.Module:
    """Make ``module`` recompute its forward during backward (non-reentrant); idempotent."""
    if getattr(module, _CHECKPOINTED, False):
        return module
    from torch.utils.checkpoint import checkpoint

    inner = module.forward

    @functools.wraps(inner)
    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # nothing to save, nothing to recompute
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward
    setattr(module, _CHECKPOINTED, True)
    return module


def free_local_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_group(backend: str = "gloo") -> bool:
    """Initialize a 1-rank default process group on 127.0.0.1 unless one exists; True when it created one."""
    if dist.is_initialized():
        return False
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_local_port()}", rank=0, world_size=1)
    return True


def compute_dtype_of(model: nn.Module) -> torch.dtype:
    """The dtype forward/backward run in: FSDP2's ``param_dtype`` where a policy sets one, else the parameters'."""
    state = getattr(model, "_get_fsdp_state", None)
    if callable(state):
        policy = getattr(state(), "_mp_policy", None)
        if policy is not None and policy.param_dtype is not None:
            return policy.param_dtype
    return next(model.parameters()).dtype
