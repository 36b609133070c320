"""FSDP2 for analysis: find a model's transformer blocks and shard each of them, then the root.

The blocks are the modules the model itself declares unsplittable (Hugging Face's ``_no_split_modules``:
``LlamaDecoderLayer``, ``MixtralDecoderLayer``, ...), so a mixture-of-experts layer is one block, never one
block per expert. Models without that declaration fall back to the largest repeated ``ModuleList``.
"""

from __future__ import annotations

from torch import nn


def _declared_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every outermost module whose class the model lists in ``_no_split_modules``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        # by MRO: fully_shard swaps a module's class for a subclass (FSDPLlamaDecoderLayer)
        declared = any(cls.__name__ in names for cls in type(module).__mro__)
        if not declared or not any(True for _ in module.parameters()):
            continue
        if any(path.startswith(outer + ".") for outer, _ in found):
            continue  # inside a block already found (named_modules is pre-order)
        found.append((path, module))
    return found


def _repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the repeated layers: the largest ModuleList whose entries share one class."""
    best: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) > len(best)
                and len({type(m) for m in module}) == 1 and any(True for _ in module.parameters())):
            best = [(f"{path}.{i}", m) for i, m in enumerate(module)]
    return best


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the transformer blocks: the model's declared ``_no_split_modules`` when it has them
    (the root itself excluded), else the largest repeated ModuleList."""
    declared = [(path, m) for path, m in _declared_blocks(model) if path]
    return declared or _repeated_blocks(model)


def shard_model(model: nn.Module, *, mesh=None, mp_policy=None) -> nn.Module:
    """Apply ``fully_shard`` to every transformer block, then to the root (torchtitan's order).

    Works on a model built on the meta device too: then only the local shards are materialised later
    (``model.to_empty``). Tied parameters (lm_head = input embedding) live outside the blocks, in the root's
    group, so the tie survives.
    ``mp_policy``: an FSDP2 ``MixedPrecisionPolicy`` (see hessian_core.precision). Activation checkpointing, when
    wanted, comes first: ``hessian_core.models.parallelize`` applies both in order."""
    from torch.distributed.fsdp import fully_shard

    policy = {} if mp_policy is None else {"mp_policy": mp_policy}
    for _, block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, **policy)
    fully_shard(model, mesh=mesh, **policy)
    return model


def reshard(model: nn.Module) -> None:
    """Free an FSDP2 root left gathered by a forward without backward (no-op for plain models)."""
    fn = getattr(model, "reshard", None)
    if callable(fn):
        fn()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
