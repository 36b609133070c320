"""Loading a causal LM for analysis: pretrained from a local folder or hub id, or random weights from a config."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from hessian_core import float64_rmsnorm

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """What each rank needs to build the same model."""

    path: str | None
    revision: str | None = None
    init: str = "pretrained"  # pretrained | random
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    config_overrides: dict = field(default_factory=dict)  # HF config kwargs (random init without a path)
    seed: int = 0  # random init


def has_weights(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES)


def load_model(spec: ModelSpec) -> torch.nn.Module:
    """Build the model on CPU in eval mode with every parameter trainable (the caller moves and shards it)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per rank would drown the driver's progress output
    dtype = DTYPES[spec.dtype]
    if spec.init == "random":
        if spec.path:
            config = AutoConfig.from_pretrained(spec.path, revision=spec.revision, **spec.config_overrides)
        else:
            overrides = dict(spec.config_overrides)
            config = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
        torch.manual_seed(spec.seed)  # every rank draws the same weights
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=spec.attn_implementation)
    else:
        model = AutoModelForCausalLM.from_pretrained(spec.path, revision=spec.revision, dtype=dtype,
                                                     attn_implementation=spec.attn_implementation)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    float64_rmsnorm(model)
    return model


def block_names(spec: ModelSpec) -> list[str]:
    """The model's blocks (hessian_core.parameter_blocks), from a weightless copy on the meta device: what the
    driver needs to queue per-block tasks before any rank has loaded the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from hessian_core import ParamSpace, parameter_blocks

    if spec.path:
        config = AutoConfig.from_pretrained(spec.path, revision=spec.revision,
                                            **(spec.config_overrides if spec.init == "random" else {}))
    else:
        overrides = dict(spec.config_overrides)
        config = AutoConfig.for_model(overrides.pop("model_type"), **overrides)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[spec.dtype])
    for p in model.parameters():
        p.requires_grad_(True)
    return list(parameter_blocks(model, ParamSpace(model)))
