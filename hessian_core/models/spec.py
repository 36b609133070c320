"""What every rank needs to build the same model (``ModelSpec``), and the names its fields take."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What each rank needs to build the same model."""

    path: str | None
    revision: str | None = None
    init: str = "pretrained"  # pretrained | random
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    config_overrides: dict = field(default_factory=dict)  # HF config kwargs (random init, or a DCP architecture)
    seed: int = 0  # random init
    config_path: str | None = None  # HF config folder for the architecture (a DCP model.path has none)
    loading: str = "auto"  # auto | full | sharded (see hessian_core.models.loading.choose_loading)
    compute_dtype: str | None = None  # forward/backward dtype (None: dtype); see hessian_core.precision
    activation_checkpointing: bool = False  # recompute each transformer block in the backward
