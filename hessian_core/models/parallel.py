"""``parallelize(model, spec, mesh)``: how a model is wrapped for analysis, in one fixed order (torchtitan's):
activation checkpointing on every transformer block, then FSDP2's mixed-precision policy, then ``fully_shard``
on every block and then on the root."""

from __future__ import annotations

import torch
from torch import nn

from ..precision import checkpoint_module, mixed_precision_policy
from ..sharding import shard_model, transformer_blocks
from .spec import DTYPES, ModelSpec


def mixed_precision(spec: ModelSpec):
    """FSDP2's ``MixedPrecisionPolicy`` for ``spec`` (``compute_dtype`` below ``dtype``), else None."""
    return mixed_precision_policy(DTYPES[spec.dtype], DTYPES[spec.compute_dtype or spec.dtype])


def needs_mesh(spec: ModelSpec, *, world_size: int) -> bool:
    """FSDP2 over several ranks, or on one rank for mixed precision (see hessian_core.precision)."""
    return world_size > 1 or mixed_precision(spec) is not None


def device_mesh(spec: ModelSpec, *, device: torch.device, world_size: int):
    """The 1-D mesh ``parallelize`` shards over, or None where the model stays plain (a process group of
    ``world_size`` ranks must exist when one is needed)."""
    if not needs_mesh(spec, world_size=world_size):
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device.type, (world_size,))


def checkpoint_blocks(model: nn.Module) -> int:
    """Activation checkpointing on every transformer block; returns how many blocks are wrapped."""
    blocks = transformer_blocks(model)
    for _, block in blocks:
        checkpoint_module(block)
    return len(blocks)


def parallelize(model: nn.Module, spec: ModelSpec, mesh=None) -> nn.Module:
    """Activation checkpointing (``spec.activation_checkpointing``), then mixed precision (``spec.compute_dtype``)
    and FSDP2 over ``mesh``: each transformer block, then the root. ``mesh`` None: the model stays plain, which
    mixed precision cannot (it is FSDP2's policy). Works on a meta model too (shards materialised later)."""
    policy = mixed_precision(spec)
    if mesh is None and policy is not None:
        raise ValueError(f"model.compute_dtype={spec.compute_dtype} below model.dtype={spec.dtype} runs through "
                         f"FSDP2: parallelize needs a device mesh (device_mesh)")
    if spec.activation_checkpointing:
        checkpoint_blocks(model)
    if mesh is not None:
        shard_model(model, mesh=mesh, mp_policy=policy)
    return model
