"""Sharded loading: build the model on the meta device, shard it, materialise only this rank's shards, then
fill them from Hugging Face safetensors or a torch.distributed.checkpoint (DCP) folder.

No rank ever holds a full copy of a parameter it does not own: safetensors are read row-block by row-block
straight into the shards (``safetensors_slices``: positioned reads, no memory map); DCP checkpoints (and any
tensor whose shard is not a block of rows) through DCP's planner, which asks the storage reader only for the
pieces that overlap the rank's shards. Each slice is converted to the model's dtype as it is copied in.

Checkpoint key layout (both formats): the model's own state-dict names as ``model.state_dict()`` (or
``torch.distributed.checkpoint.state_dict.get_model_state_dict``) gives them, e.g.
``model.layers.0.self_attn.q_proj.weight``: at the top level, or all under one ``model`` entry
(``dcp.save({"model": state_dict, "optimizer": ...})``; the other top-level entries are ignored). A tied
alias (``lm_head.weight`` when it is the input embedding) may be present or absent.
"""

from __future__ import annotations

import os
import re
import warnings

import torch
from torch import nn

from .build import build
from .config import DCP_METADATA, SAFETENSORS_INDEX, checkpoint_format
from .parallel import parallelize
from .spec import ModelSpec

NESTED_PREFIX = "model."  # dcp.save({"model": state_dict, ...}) flattens the model's keys under this


def state_keys(model: nn.Module) -> tuple[list[str], set[str]]:
    """(keys a checkpoint must hold, tied aliases it may hold): one name per distinct parameter (its first
    name, as ``named_parameters`` gives it) plus the persistent buffers; the other names of shared ones."""
    keys = [name for name, _ in model.named_parameters()]
    aliases = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(keys)
    for name, _ in model.named_buffers():
        owner, _, leaf = name.rpartition(".")
        if leaf not in model.get_submodule(owner)._non_persistent_buffers_set:
            keys.append(name)
    return keys, aliases


def read_dcp_metadata(path: str):
    """The ``.metadata`` of the DCP checkpoint ``path``; ValueError naming the file where it is empty or corrupt."""
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata

    file = os.path.join(path, DCP_METADATA)
    try:
        metadata = FileSystemReader(path).read_metadata()
    except (EOFError, pickle.UnpicklingError, AttributeError, ImportError, IndexError, KeyError, TypeError,
            ValueError, OverflowError) as e:  # what unpickling an empty, truncated or foreign file raises
        raise ValueError(f"DCP metadata {file!r} is empty or corrupt ({type(e).__name__}); write the checkpoint "
                         f"again with torch.distributed.checkpoint.save") from None
    if not isinstance(metadata, Metadata):
        raise ValueError(f"DCP metadata {file!r} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


def stored_tensors(path: str) -> dict[str, tuple[list[int] | None, str]]:
    """Stored key -> (shape, None for a non-tensor entry; the file that describes it), from a DCP checkpoint's
    ``.metadata`` or the safetensors headers (index-sharded too): no tensor data is read."""
    fmt = checkpoint_format(path)
    if fmt == "dcp":
        file = os.path.join(path, DCP_METADATA)
        return {k: (list(m.size) if hasattr(m, "size") else None, file)
                for k, m in read_dcp_metadata(path).state_dict_metadata.items()}
    if fmt != "safetensors":
        raise ValueError(f"{path!r} is neither a DCP checkpoint ({DCP_METADATA}) nor a safetensors folder")
    from .safetensors_slices import read_header, weight_files

    headers: dict[str, dict] = {}
    out = {}
    for key, file in weight_files(path).items():
        if file not in headers:
            headers[file] = read_header(file)[1]
        header = headers[file]
        if key not in header:
            raise ValueError(f"weight index {os.path.join(path, SAFETENSORS_INDEX)!r} places {key!r} in {file!r}, "
                             f"whose header does not hold it")
        out[key] = (list(header[key]["shape"]), file)
    return out


def stored_keys(path: str) -> list[str]:
    """The tensor keys a checkpoint folder holds, read from its metadata (no tensor data is read)."""
    return list(stored_tensors(path))


def key_mismatch(expected: list[str], aliases: set[str], stored: list[str], *, nested: bool = True,
                 ignored: re.Pattern | None = None) -> tuple[str, str | None]:
    """(prefix, problem): the prefix ('' or, where ``nested``, 'model.') under which ``stored`` holds the model
    (the layout that holds more of its keys), and None or a one-line description of the first key missing or
    unexpected. At the top level every stored key must be the model's, a tied alias, or match ``ignored``
    (keys transformers drops while loading); under 'model.' only the keys under it are checked."""
    stored_set = set(stored)
    top = sum(k in stored_set for k in expected)
    below = sum(NESTED_PREFIX + k in stored_set for k in expected) if nested else -1
    prefix = NESTED_PREFIX if below > top else ""
    missing = next((k for k in expected if prefix + k not in stored_set), None)
    if missing is not None:
        return prefix, f"has no key {prefix + missing!r} (the first missing of the model's {len(expected)} keys)"
    allowed = {prefix + k for k in (*expected, *aliases)}
    unexpected = next((k for k in stored if k.startswith(prefix) and k not in allowed
                       and not (ignored and ignored.search(k[len(prefix):]))), None)
    if unexpected is not None:
        return prefix, f"has unexpected key {unexpected!r} (not a parameter or persistent buffer of the model)"
    return prefix, None


def ignored_on_load(model: nn.Module) -> re.Pattern | None:
    """Stored keys that transformers drops while loading ``model`` instead of reporting them unexpected: its
    ``_keys_to_ignore_on_load_unexpected``, and buffers that older checkpoints saved (``rotary_emb.inv_freq``,
    ``position_ids``)."""
    patterns = set(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())
    buffers = [name for name, _ in model.named_buffers()]
    if any(name.endswith("rotary_emb.inv_freq") for name in buffers):
        patterns.add(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name in buffers):
        patterns.add(r"(^|\.)position_ids$")
    return re.compile("|".join(f"({p})" for p in sorted(patterns))) if patterns else None


def stored_names(model: nn.Module, keys: list[str], *, path: str) -> dict[str, str]:
    """Model key -> the name the checkpoint stores it under. DCP stores the model's own names; Hugging Face
    safetensors may hold older names that transformers 5 renames while loading (GPT-NeoX's ``lm_head.weight``
    is ``embed_out.weight``): the renames are taken from transformers' own reverse mapping. Keys that a
    conversion merges or splits (transformers 5's fused mixture-of-experts weights) keep their name and so
    come out missing."""
    if checkpoint_format(path) != "safetensors":
        return {k: k for k in keys}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: checkpoints use the modules' names
        return {k: k for k in keys}
    state = model.state_dict()
    tensors = {k: state[k].detach() for k in keys}  # distinct objects, so that tied aliases are told apart
    by_id = {id(t): name for name, t in revert_weight_conversion(model, dict(tensors)).items()}
    return {k: by_id.get(id(t), k) for k, t in tensors.items()}


def read_plan(model: nn.Module, path: str, *, stored: list[str] | None = None) -> tuple[dict[str, str], str | None]:
    """(model key -> stored key of every tensor to read, None or a one-line problem with the checkpoint);
    ``stored``: the checkpoint's keys where the caller has read them."""
    expected, aliases = state_keys(model)
    names = stored_names(model, [*expected, *aliases], path=path)
    stored = stored_keys(path) if stored is None else stored
    prefix, problem = key_mismatch([names[k] for k in expected], {names[a] for a in aliases}, stored,
                                   ignored=ignored_on_load(model))
    return {k: prefix + names[k] for k in expected}, problem


def materialize(model: nn.Module, *, device: torch.device) -> None:
    """Allocate this rank's shards (uninitialised) on ``device`` and keep the real buffers' values."""
    buffers = {name: b for name, b in model.named_buffers()}
    tied = _tied_pairs(model)
    model.to_empty(device=device)
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value.to(device)
    for (owner, leaf), (src_owner, src_leaf) in tied:
        source = getattr(model.get_submodule(src_owner), src_leaf)
        if getattr(model.get_submodule(owner), leaf) is not source:
            setattr(model.get_submodule(owner), leaf, source)


def _tied_pairs(model: nn.Module) -> list[tuple[tuple[str, str], tuple[str, str]]]:
    """((module, attr) of each alias, (module, attr) of the parameter's first name)."""
    first: dict[int, tuple[str, str]] = {}
    pairs = []
    for name, p in model.named_parameters(remove_duplicate=False):
        owner, _, leaf = name.rpartition(".")
        if id(p) in first:
            pairs.append(((owner, leaf), first[id(p)]))
        else:
            first[id(p)] = (owner, leaf)
    return pairs


def fill_from_checkpoint(model: nn.Module, path: str, *, names: dict[str, str]) -> None:
    """Read this rank's slices of the tensors ``names`` maps (model key -> stored key) into the model: rows of
    safetensors by positioned reads (``safetensors_slices``), anything else through DCP's planner."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from .safetensors_slices import read_into

    full = model.state_dict()  # DTensors of the local shards (FSDP2) or the tensors themselves: filled in place
    state = {stored: full[key] for key, stored in names.items()}
    reader = None
    if checkpoint_format(path) != "dcp":
        state = {key: state[key] for key in read_into(state, path)}
        reader = dcp.HuggingFaceStorageReader(path)
    if not state:
        return
    with warnings.catch_warnings():  # one process: DCP plans locally, and would warn that it does
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, storage_reader=reader, no_dist=not dist.is_initialized())


def load_sharded(spec: ModelSpec, *, device: torch.device, mesh=None, model: nn.Module | None = None) -> nn.Module:
    """Meta build (or ``model``, already built on meta), ``parallelize`` over ``mesh`` (None: unsharded), local
    shards allocated on ``device`` and read from ``spec.path``."""
    model = build(spec, device="meta") if model is None else model
    names, problem = read_plan(model, spec.path)
    if problem:
        raise ValueError(f"model.path {spec.path!r} {problem}")
    parallelize(model, spec, mesh)
    materialize(model, device=device)
    fill_from_checkpoint(model, spec.path, names=names)
    return model
