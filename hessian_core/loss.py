"""The analysis loss: next-token cross-entropy of a causal LM (masked or not), or a user's ``loss_fn``.

A batch is a ``[batch, seq_len]`` tensor of ``input_ids`` or a dict with ``input_ids`` and optionally
``attention_mask`` and ``labels`` (aligned with ``input_ids``, Hugging Face style: position t's label is
predicted from positions < t; ``-100`` is ignored). Without ``labels`` the labels are the ``input_ids``
with padded positions (``attention_mask == 0``) ignored.

The default loss is the **mean over the counted tokens of the whole analysis set**: the sum of the
per-token cross-entropies over every batch (and, under FSDP2, every rank) divided by the number of
counted tokens. It is not a mean of batch means: a batch with few counted tokens weighs little. With
``loss_fn(model, batch) -> scalar`` the analysis loss is the mean of ``loss_fn`` over the batches (and
the ranks).

The cross-entropy is computed here from the logits in the parameters' own dtype: HF's ``labels=`` path
upcasts logits to float32, which would silently cap float64 validation at float32 precision.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .sharding import reshard
from .vectors import ParamSpace

IGNORE_INDEX = -100
Batch = Tensor | Mapping[str, Tensor]
LossFn = Callable[[torch.nn.Module, Batch], Tensor]
BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def as_batch(batch: Batch) -> dict[str, Tensor]:
    """A batch as a dict with ``input_ids`` and optional ``attention_mask`` / ``labels`` of the same shape."""
    out = {"input_ids": batch} if isinstance(batch, Tensor) else dict(batch)
    unknown = sorted(set(out) - set(BATCH_KEYS))
    if "input_ids" not in out or unknown:
        raise ValueError(f"a batch is an input_ids tensor or a dict with keys {BATCH_KEYS}, got keys {sorted(out)}")
    ids = out["input_ids"]
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [batch, seq_len >= 2], got shape {tuple(ids.shape)}")
    for key in ("attention_mask", "labels"):
        if out.get(key) is not None and out[key].shape != ids.shape:
            raise ValueError(f"{key} has shape {tuple(out[key].shape)}, input_ids {tuple(ids.shape)}")
    return out


def shifted_labels(batch: Mapping[str, Tensor]) -> Tensor:
    """The targets of positions 0..T-2: labels[:, 1:], with padding (attention_mask 0) set to IGNORE_INDEX."""
    labels = batch.get("labels")
    labels = batch["input_ids"] if labels is None else labels
    mask = batch.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask == 0, IGNORE_INDEX)
    return labels[:, 1:]


def counted_tokens(batch: Batch) -> int:
    """How many target tokens of the batch the loss counts."""
    return int((shifted_labels(as_batch(batch)) != IGNORE_INDEX).sum())


def token_loss_sum(model: torch.nn.Module, batch: Batch) -> Tensor:
    """The sum of the next-token cross-entropies over the batch's counted tokens."""
    b = as_batch(batch)
    mask = b.get("attention_mask")
    logits = model(input_ids=b["input_ids"], attention_mask=mask, use_cache=False).logits
    vocab = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1, :].reshape(-1, vocab), shifted_labels(b).reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> Tensor:
    """Mean cross-entropy over the counted tokens of one batch (every predicted position when unmasked)."""
    b = as_batch(batch)
    if b.get("attention_mask") is None and b.get("labels") is None:  # the unmasked mean, as it always was
        logits = model(input_ids=b["input_ids"], use_cache=False).logits
        vocab = logits.shape[-1]
        return F.cross_entropy(logits[:, :-1, :].reshape(-1, vocab), b["input_ids"][:, 1:].reshape(-1))
    count = counted_tokens(b)
    if count == 0:
        raise ValueError("the batch has no counted tokens (every label is -100 or padded)")
    return token_loss_sum(model, b) / count


class AnalysisLoss:
    """The analysis loss as a sum of per-batch terms, so that gradients can be accumulated batch by batch.

    Default: term(b) = (sum of b's token losses) * world / (counted tokens of all batches on all ranks), so
    that FSDP2's average over ranks gives the token mean of the whole set. With ``loss_fn``: term(b) =
    loss_fn(model, b) / len(batches). ``space`` (its process group) is needed for the global token count;
    without it the count is this rank's. Building one with a sharded space is a collective call.
    """

    def __init__(self, batches: Sequence[Batch], *, loss_fn: LossFn | None = None, space: ParamSpace | None = None):
        if not batches:
            raise ValueError("the analysis set has no batches")
        self.loss_fn = loss_fn
        self.batches = list(batches) if loss_fn is not None else [as_batch(b) for b in batches]
        if loss_fn is not None:
            self.scale = 1.0 / len(self.batches)
            return
        local = sum(counted_tokens(b) for b in self.batches)
        world, total = 1, local
        if space is not None and space.group is not None:
            world = torch.distributed.get_world_size(space.group)
            total = int(space.all_reduce(torch.tensor([float(local)], dtype=torch.float64))[0])
        if total == 0:
            raise ValueError("the analysis set has no counted tokens (every label is -100 or padded)")
        self.total_tokens = total
        self.scale = world / total

    def term(self, model: torch.nn.Module, batch: Batch) -> Tensor:
        if self.loss_fn is not None:
            return self.loss_fn(model, batch) * self.scale
        return token_loss_sum(model, batch) * self.scale


def accumulate_gradient(model: torch.nn.Module, batches: Sequence[Batch], *, loss: AnalysisLoss | None = None,
                        weight: float = 1.0, into_existing: bool = False) -> Tensor:
    """Backpropagate ``weight`` x the analysis loss over ``batches`` into ``.grad``; returns the local loss (this
    rank's share, unweighted).

    Gradients start from zero (``zero_grad``: callers that must keep a training step's gradients stash them,
    as ``hessian_core.analyze`` does), unless ``into_existing``: then they are added to the ``.grad`` buffers
    already there (autograd and FSDP2 both accumulate in place), which is how the finite-difference HVP
    differences two gradients without a second buffer. Without ``loss`` the token count is this rank's own,
    which under FSDP2 gives the global token mean when every rank counts as many tokens.
    """
    loss = loss if loss is not None else AnalysisLoss(batches)
    if not into_existing:
        model.zero_grad(set_to_none=True)
    total = None
    for batch in batches:
        term = loss.term(model, batch)
        (term if weight == 1.0 else term * weight).backward()
        total = term.detach().double() if total is None else total + term.detach().double()
    return total.cpu()  # one host sync per gradient, not one per batch


def evaluate_loss(model: torch.nn.Module, batches: Sequence[Batch], *, space: ParamSpace,
                  loss: AnalysisLoss | None = None) -> float:
    """The global analysis loss without gradients (resharding an FSDP2 root that a bare forward leaves gathered)."""
    loss = loss if loss is not None else AnalysisLoss(batches, space=space)
    with torch.no_grad():
        local = sum(float(loss.term(model, b).double()) for b in batches)
    reshard(model)
    world = torch.distributed.get_world_size(space.group) if space.group is not None else 1
    return float(space.all_reduce(torch.tensor([local], dtype=torch.float64))[0]) / world


class BatchSet:
    """A whole analysis set of equal-shape batches, as the pipeline sends it to the ranks: ``input_ids``
    [num_batches, batch, seq_len] and optional ``attention_mask`` / ``labels`` of the same shape."""

    def __init__(self, input_ids: Tensor, *, attention_mask: Tensor | None = None, labels: Tensor | None = None):
        if input_ids.dim() != 3:
            raise ValueError(f"input_ids must be [num_batches, batch, seq_len], got shape {tuple(input_ids.shape)}")
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)}, input_ids {tuple(input_ids.shape)}")
        self.input_ids, self.attention_mask, self.labels = input_ids, attention_mask, labels

    @property
    def shape(self) -> torch.Size:
        return self.input_ids.shape

    def max_token_id(self) -> int:
        return int(self.input_ids.max())

    def rank_batches(self, rank: int, world: int, *, device: torch.device | str = "cpu") -> list[Batch]:
        """This rank's contiguous slice of every batch: plain tensors when there is no mask, else dicts."""
        per_rank = self.shape[1] // world
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        out: list[Batch] = []
        for k in range(self.shape[0]):
            parts = {"input_ids": self.input_ids[k, rows], "attention_mask": None if self.attention_mask is None
                     else self.attention_mask[k, rows], "labels": None if self.labels is None else self.labels[k, rows]}
            parts = {key: t.to(device) for key, t in parts.items() if t is not None}
            out.append(parts["input_ids"] if len(parts) == 1 else parts)
        return out


def rank_batches(batches: Tensor | BatchSet, rank: int, world: int, *, device: torch.device | str = "cpu") -> list[Batch]:
    """A rank's slices of an analysis set given as a [num_batches, batch, seq_len] tensor or a BatchSet."""
    return (batches if isinstance(batches, BatchSet) else BatchSet(batches)).rank_batches(rank, world, device=device)
