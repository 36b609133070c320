"""Checks that the analysis would be meaningful, made before Ray starts: a usable tokenizer for text data, token
statistics that are not degenerate, sequences within the model's context, token ids >= 0, and weight files
whose headers are intact. Each failure is a ConfigError naming the key, folder or file."""

from __future__ import annotations

import json
import os
import struct
import zipfile

import torch

from .config import ConfigError

# files that hold a tokenizer's vocabulary; a folder with none of them gets an empty tokenizer from transformers
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model", "vocab.txt", "tiktoken.model",
                   "sentencepiece.bpe.model")
MIN_DISTINCT_TOKENS = 2
MAX_TOP_TOKEN_FRACTION = 0.9  # more of one token than this: padding or a broken tokenizer, not text
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def has_tokenizer_files(folder: str) -> bool:
    names = set(os.listdir(folder))
    return any(name in names for name in TOKENIZER_FILES) or any(n.endswith(".tiktoken") for n in names)


def load_tokenizer(path: str, *, revision: str | None, key: str):
    """The tokenizer at ``path`` (a folder or hub id), refused when it is missing or has no vocabulary."""
    hint = "give data with an input_ids column, or set data.tokenizer to a folder or hub id with a tokenizer"
    if os.path.isdir(path) and not has_tokenizer_files(path):
        raise ConfigError(f"{key} {path!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...) to "
                          f"tokenize text data; {hint}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except Exception as e:  # noqa: BLE001 - missing converters, files or hub access raise many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{key} {path!r}: no usable tokenizer ({first}); {hint}") from None
    if len(tokenizer) < MIN_DISTINCT_TOKENS:
        raise ConfigError(f"{key} {path!r}: the tokenizer has {len(tokenizer)} token(s), no vocabulary; {hint}")
    return tokenizer


def check_token_statistics(batches: torch.Tensor, *, data_path: str) -> None:
    """Refuse negative ids and an analysis set of (almost) one token: its Hessian says nothing about text."""
    low = int(batches.min())
    if low < 0:
        raise ConfigError(f"data.path {data_path!r} has token id {low}; token ids must be >= 0")
    counts = torch.bincount(batches.reshape(-1))
    distinct = int((counts > 0).sum())
    top = int(counts.argmax())
    fraction = float(counts[top]) / batches.numel()
    if distinct < MIN_DISTINCT_TOKENS or fraction > MAX_TOP_TOKEN_FRACTION:
        raise ConfigError(f"data.path {data_path!r}: the analysis set is degenerate: {distinct} distinct token(s) in "
                          f"{batches.numel()} tokens, token {top} is {fraction:.0%} of them; check the tokenizer and "
                          f"the text column")


def context_length(hf_config) -> int | None:
    for key in CONTEXT_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(hf_config, seq_len: int) -> None:
    """A sequence longer than the positions the model has: an IndexError (learned positions) or an untrained
    extrapolation (RoPE) later, so it is refused here."""
    limit = context_length(hf_config)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"data.seq_len={seq_len} is beyond the model's context of {limit} tokens "
                          f"(max_position_embeddings); set data.seq_len <= {limit}")


def check_weight_files(folder: str) -> None:
    """Read each weight file's header (safetensors) or directory (torch zip) and refuse a truncated or corrupt
    file by name, instead of an internal error on every rank after Ray has started."""
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            _check_safetensors(path)
        elif name.endswith(".bin") and name.startswith("pytorch_model"):
            if os.path.getsize(path) == 0 or (_starts_as_zip(path) and not zipfile.is_zipfile(path)):
                raise ConfigError(f"weight file {path!r} is empty or corrupt")
        elif name.endswith(".index.json"):
            _check_index(folder, path)


def _starts_as_zip(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _check_safetensors(path: str) -> None:
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"header of {length} bytes in a {size}-byte file")
            header = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if 8 + length + end > size:
            raise ValueError(f"tensors end at byte {8 + length + end} of a {size}-byte file (truncated)")
    except (struct.error, ValueError, KeyError, TypeError, IndexError) as e:
        raise ConfigError(f"weight file {path!r} is corrupt: {e}") from None
    from hessian_core.models.safetensors_slices import SAFETENSORS_DTYPES

    for key, entry in header.items():
        if key != "__metadata__" and entry.get("dtype") not in SAFETENSORS_DTYPES:
            raise ConfigError(f"weight file {path!r} stores tensor {key!r} as dtype {entry.get('dtype')!r}, which "
                              f"torch cannot hold; valid: {', '.join(SAFETENSORS_DTYPES)}")


def _check_index(folder: str, path: str) -> None:
    try:
        with open(path) as f:
            shards = set(json.load(f)["weight_map"].values())
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"weight index {path!r} is corrupt: {e}") from None
    for shard in sorted(shards):
        if not os.path.exists(os.path.join(folder, shard)):
            raise ConfigError(f"weight index {path!r} names {shard!r}, which is not in {folder!r}")
