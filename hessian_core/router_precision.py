"""Float64 mixture-of-experts routers.

Hugging Face MoE routers (Mixtral, Qwen2-MoE, Qwen3-MoE, on transformers 4 and 5) take the softmax of the router
logits in float32 (``softmax(..., dtype=torch.float)`` or ``logits.float()``) whatever the model dtype. Like the
float32 RMSNorm (see ``numerics``), that caps a float64 model's loss at float32 round-off, and a float64 finite
difference then fails: measured on a tiny Mixtral, the FD HVP's error against the dense Hessian grew from
4e-7 at eps 1e-4 to 2.6e-5 at eps 1e-6. For float64 models the router modules run under a torch-function mode
in which a float32 cast of a float64 tensor is a no-op, so the routing weights stay float64.
"""

from __future__ import annotations

import functools
import re
import types

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# the modules that compute routing weights: transformers 5's routers, transformers 4's sparse MoE blocks
ROUTER_CLASS = re.compile(r"(TopKRouter|Router|SparseMoeBlock|MoeBlock)$")


def _is_float64(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.float64


class KeepFloat64(TorchFunctionMode):
    """Inside: ``x.float()``, ``x.to(torch.float32)`` and ``softmax(x, dtype=torch.float32)`` leave a float64
    ``x`` in float64; everything else runs unchanged."""

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if args and _is_float64(args[0]):
            if func is torch.Tensor.float:
                return args[0]
            if func is torch.Tensor.to and torch.float32 in (*args[1:], kwargs.get("dtype")):
                return args[0]
            if func in (F.softmax, torch.softmax, torch.Tensor.softmax) and kwargs.get("dtype") == torch.float32:
                kwargs["dtype"] = torch.float64
        return func(*args, **kwargs)


def keeping_float64(forward):
    """``forward`` (bound) run under ``KeepFloat64``."""
    @functools.wraps(forward)
    def run(self, *args, **kwargs):
        with KeepFloat64():
            return forward(*args, **kwargs)

    return run


def float64_routers(model: nn.Module) -> int:
    """Make every float64 MoE router compute its routing weights in float64; returns how many changed."""
    changed = 0
    for module in model.modules():
        params = list(module.parameters())
        if ROUTER_CLASS.search(type(module).__name__) and params and params[0].dtype == torch.float64:
            module.forward = types.MethodType(keeping_float64(module.forward), module)
            changed += 1
    return changed
