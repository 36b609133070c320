"""The analysis loss: mean next-token cross-entropy of a causal LM, in the parameters' own dtype.

HF's ``labels=`` path upcasts logits to float32, which would silently cap float64 validation at float32
precision, so the loss is computed here from the logits.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .sharding import reshard
from .vectors import ParamSpace


def causal_lm_loss(model: torch.nn.Module, input_ids: Tensor) -> Tensor:
    """Mean cross-entropy over every predicted position of a batch of equal-length sequences."""
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [batch, seq_len >= 2], got shape {tuple(input_ids.shape)}")
    logits = model(input_ids=input_ids, use_cache=False).logits
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1, :].reshape(-1, vocab), input_ids[:, 1:].reshape(-1))


def accumulate_gradient(model: torch.nn.Module, batches: Sequence[Tensor]) -> Tensor:
    """Backpropagate the analysis loss (the mean of the batch losses) into ``.grad``; returns the local loss.

    Gradients start from zero. Under FSDP2 each rank passes its slice of every global batch and the
    reduce-scatter averages over ranks, which gives the global mean when the slices are equal.
    """
    if not batches:
        raise ValueError("the analysis set has no batches")
    model.zero_grad(set_to_none=True)
    total = None
    for batch in batches:
        loss = causal_lm_loss(model, batch) / len(batches)
        loss.backward()
        total = loss.detach().double() if total is None else total + loss.detach().double()
    return total.cpu()  # one host sync per gradient, not one per batch


def evaluate_loss(model: torch.nn.Module, batches: Sequence[Tensor], *, space: ParamSpace) -> float:
    """The global analysis loss without gradients (resharding an FSDP2 root that a bare forward leaves gathered)."""
    with torch.no_grad():
        local = sum(float(causal_lm_loss(model, b).double()) for b in batches) / len(batches)
    reshard(model)
    world = torch.distributed.get_world_size(space.group) if space.group is not None else 1
    return float(space.all_reduce(torch.tensor([local], dtype=torch.float64))[0]) / world
