"""Refusing, before Ray starts, a DCP or safetensors checkpoint that the ranks would not read completely and
exactly: a key missing or unexpected for the way it will be read (sharded by ``hessian_core.models.sharded``, or
fully by transformers' ``from_pretrained``, which would leave a missing tensor randomly initialised); a tied
alias such as ``lm_head.weight`` may be present or absent. Then a shape unlike the model's, and a DCP data file
missing or shorter than its metadata records. Only the DCP metadata and the safetensors headers are read; the
model is built on the meta device (``build(spec, device="meta")``)."""

from __future__ import annotations

import os

from torch import nn

from .build import build
from .config import checkpoint_format
from .loading import reads_sharded
from .sharded import (ignored_on_load, key_mismatch, read_dcp_metadata, read_plan, state_keys, stored_names,
                      stored_tensors)
from .spec import ModelSpec

StoredTensors = dict[str, tuple[list[int] | None, str]]  # stored key -> (shape, the file describing it)


def check_checkpoint(spec: ModelSpec, *, world_size: int = 1) -> None:
    """Raise ValueError, in one line naming the folder and the first key, tensor or file at fault, where
    ``spec.path`` (a DCP or safetensors folder) would not load exactly into the model on ``world_size`` ranks."""
    model = build(spec, device="meta")
    stored = stored_tensors(spec.path)
    fmt = checkpoint_format(spec.path)
    names, problem = read_plan(model, spec.path, stored=list(stored))
    if reads_sharded(spec, world_size=world_size, problem=problem):
        hint = "a checkpoint holds the model's state-dict names at the top level or under 'model.'"
        if problem and fmt == "safetensors" and saved_layout(model, spec.path, stored)[1] is None:
            hint = "its keys are transformers' saved layout, which only the full load converts: set model.loading=auto"
        state = model.state_dict()
        shapes = {names[k]: list(state[k].shape) for k in names}
    else:
        hint = "the full load (from_pretrained) would leave the model's missing tensors randomly initialised"
        shapes, problem = saved_layout(model, spec.path, stored)
    if problem is None:
        problem, hint = shape_problem(shapes, stored), "model.config_path or config.json is another model's"
    if problem is None and fmt == "dcp":
        problem, hint = data_file_problem(spec.path, set(shapes)), "write the checkpoint again"
    if problem:
        raise ValueError(f"model.path {spec.path!r} {problem}; {hint}")


def saved_layout(model: nn.Module, path: str, stored: StoredTensors) -> tuple[dict[str, list[int]], str | None]:
    """(stored name -> shape of every tensor ``from_pretrained`` fills, None or the first key missing or
    unexpected): the model's tensors as transformers 5 saves them (renamed keys, mixture-of-experts weights
    unfused per expert; the model's own names on transformers 4), at the top level of the checkpoint, where
    keys without the base model's prefix count with it, as ``from_pretrained`` reads them."""
    expected, aliases = state_keys(model)
    state = model.state_dict()
    tensors = {k: state[k].detach() for k in expected}
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: checkpoints use the modules' names
        saved = tensors
    else:
        saved = revert_weight_conversion(model, dict(tensors))
    alias_names = set(stored_names(model, sorted(aliases), path=path).values())
    base = getattr(model, "base_model_prefix", "")  # a base model's checkpoint (GPT-2's, without `transformer.`)
    layout = {(f"{base}.{k}" if base and k not in saved and f"{base}.{k}" in saved else k): k for k in stored}
    _, problem = key_mismatch(list(saved), alias_names, list(layout), nested=False, ignored=ignored_on_load(model))
    return {layout.get(k, k): list(t.shape) for k, t in saved.items()}, problem


def shape_problem(shapes: dict[str, list[int]], stored: StoredTensors) -> str | None:
    """The first stored tensor (of those the load reads) whose shape is not the model's, in one line."""
    for key, shape in shapes.items():
        stored_shape, file = stored[key]
        if stored_shape is None:
            return f"holds {key!r} in {file!r} as an object, not a tensor"
        if list(stored_shape) != shape:
            return f"holds {key!r} with shape {list(stored_shape)} in {file!r}, but the model's is {shape}"
    return None


def data_file_problem(path: str, keys: set[str]) -> str | None:
    """The first DCP data file (``.distcp``) holding one of ``keys`` that is missing, or shorter than the byte
    ranges the metadata records in it."""
    ends: dict[str, tuple[int, str]] = {}  # file -> (the byte where its last tensor ends, that tensor's key)
    for index, info in (read_dcp_metadata(path).storage_data or {}).items():
        if index.fqn in keys:
            file = os.path.join(path, info.relative_path)
            end = info.offset + info.length
            if end > ends.get(file, (-1, ""))[0]:
                ends[file] = (end, index.fqn)
    for file, (end, key) in sorted(ends.items()):
        if not os.path.isfile(file):
            return f"lacks the data file {file!r}, which its metadata says holds {key!r}"
        size = os.path.getsize(file)
        if size < end:
            return f"has a truncated data file {file!r}: {size} bytes, but {key!r} ends at byte {end}"
    return None
