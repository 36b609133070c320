"""FSDP2 for analysis: find a model's transformer blocks and shard each of them, then the root."""

from __future__ import annotations

from torch import nn


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of the repeated layers: the largest ModuleList whose entries share one class."""
    best: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module) > len(best)
                and len({type(m) for m in module}) == 1 and any(True for _ in module.parameters())):
            best = [(f"{path}.{i}", m) for i, m in enumerate(module)]
    return best


def shard_model(model: nn.Module, *, mesh=None) -> nn.Module:
    """Apply ``fully_shard`` to every transformer block, then to the root (torchtitan's order)."""
    from torch.distributed.fsdp import fully_shard

    for _, block in transformer_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def reshard(model: nn.Module) -> None:
    """Free an FSDP2 root left gathered by a forward without backward (no-op for plain models)."""
    fn = getattr(model, "reshard", None)
    if callable(fn):
        fn()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())
