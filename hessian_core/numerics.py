"""Numerical fixes that float64 analysis needs on Hugging Face models, in one place for every entry point.

transformers computes some pieces in float32 whatever the model dtype, which caps a float64 model's loss at
float32 round-off (about 1e-7) and so ruins float64 finite differences:
- Llama/Qwen-style RMSNorm casts its input to float32;
- mixture-of-experts routers take their softmax in float32 (see ``router_precision``);
- eager attention takes its softmax in float32 (``softmax(..., dtype=torch.float32)``): on a tiny float64
  Llama, lambda_max was off by 4e-4 while the FD error estimate said 1e-8. sdpa has no such cast.
``float64_numerics`` makes all three compute in float64 on float64 modules; lower precisions keep the
library's own behaviour. The CLI's model loading applies it for good; ``analyze`` applies it for the duration
of the call and then puts the user's forwards back.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import torch
from torch import nn

from .router_precision import float64_routers, keeping_float64

_MISSING = object()


def _rmsnorm_forward_float64(self, hidden_states: torch.Tensor) -> torch.Tensor:
    x = hidden_states.to(torch.float64)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * x.to(hidden_states.dtype)


def _is_float64(module: nn.Module) -> bool:
    first = next(module.parameters(), None)
    return first is not None and first.dtype == torch.float64


def float64_rmsnorm(model: nn.Module) -> int:
    """Make every float64 RMSNorm (HF's ``*RMSNorm`` modules) compute in float64; returns how many changed."""
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
                and isinstance(weight, torch.Tensor) and weight.dtype == torch.float64):
            module.forward = types.MethodType(_rmsnorm_forward_float64, module)
            changed += 1
    return changed


def float64_attention(model: nn.Module) -> int:
    """Make every float64 attention module (HF's ``*Attention``) keep its float64 tensors in float64, so an
    eager softmax runs in float64; returns how many changed. A no-op for sdpa, which casts nothing."""
    changed = 0
    for module in model.modules():
        if type(module).__name__.endswith("Attention") and _is_float64(module):
            module.forward = types.MethodType(keeping_float64(module.forward), module)
            changed += 1
    return changed


def float64_numerics(model: nn.Module) -> Callable[[], None]:
    """Make a float64 model compute in float64 where transformers uses float32 (RMSNorm, MoE routers, eager
    attention); returns a function that puts every replaced ``forward`` back as it was."""
    before = {m: m.__dict__.get("forward", _MISSING) for m in model.modules()}
    float64_rmsnorm(model)
    float64_routers(model)
    float64_attention(model)
    replaced = [(m, old) for m, old in before.items() if m.__dict__.get("forward", _MISSING) is not old]

    def restore() -> None:
        for module, old in replaced:
            if old is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.forward = old

    return restore
