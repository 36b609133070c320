"""Numerical fixes that float64 analysis needs on Hugging Face models.

Llama/Qwen-style RMSNorm casts its input to float32 whatever the model dtype, which caps a float64 model's
gradients at float32 round-off (about 1e-7) and so ruins float64 finite differences. For float64 models the
norm is made to compute in float64; lower precisions keep the library's own behaviour.
"""

from __future__ import annotations

import types

import torch
from torch import nn


def _rmsnorm_forward_float64(self, hidden_states: torch.Tensor) -> torch.Tensor:
    x = hidden_states.to(torch.float64)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
    return self.weight * x.to(hidden_states.dtype)


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
