"""The one place a model's Hugging Face config is resolved (``hf_config``), and what a model folder holds."""

from __future__ import annotations

import os

from .spec import ModelSpec

DCP_METADATA = ".metadata"
SAFETENSORS_INDEX = "model.safetensors.index.json"
WEIGHT_FILES = ("model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_format(path: str | None) -> str:
    """``dcp``, ``safetensors`` (single file or index-sharded), ``other`` (.bin, a hub id) or ``none``."""
    if not path:
        return "none"
    if os.path.isfile(os.path.join(path, DCP_METADATA)):
        return "dcp"
    if os.path.isfile(os.path.join(path, SAFETENSORS_INDEX)) or os.path.isfile(os.path.join(path, "model.safetensors")):
        return "safetensors"
    return "other"


def has_weights(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, name)) for name in WEIGHT_FILES)


def hf_config(spec: ModelSpec):
    """The Hugging Face config of the architecture ``spec`` builds, as every rank builds it:
    - a DCP checkpoint (which holds no config): ``config_path``'s config with ``config_overrides`` applied, or
      ``config_overrides`` alone (with ``model_type``);
    - a Hugging Face folder or hub id: its own config, with ``config_overrides`` applied for random weights only
      (pretrained weights must fit the architecture they were saved with);
    - no path: ``config_overrides`` alone (with ``model_type``).
    Raises ValueError where the architecture is not given, OSError where a folder or hub id cannot be read."""
    from transformers import AutoConfig

    overrides = dict(spec.config_overrides)
    if spec.path and checkpoint_format(spec.path) == "dcp":
        if spec.config_path:
            return AutoConfig.from_pretrained(spec.config_path, **overrides)
        if "model_type" not in overrides:
            raise ValueError(f"model.path {spec.path!r} is a DCP checkpoint: set model.config_path (a folder with "
                             f"the HF config.json) or model.config with model_type")
    elif spec.path:
        return AutoConfig.from_pretrained(spec.path, revision=spec.revision,
                                          **(overrides if spec.init == "random" else {}))
    if "model_type" not in overrides:
        raise ValueError("model.config needs model_type when model.path is null (random weights from a config)")
    return AutoConfig.for_model(overrides.pop("model_type"), **overrides)
