"""The analysis set: fixed-length token sequences from a local file or folder or a hub dataset, via HF datasets."""

from __future__ import annotations

import os

import torch

from .config import ConfigError, DataConfig
from .sanity import load_tokenizer

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def looks_local(path: str) -> bool:
    """A path meant as a local file or folder rather than a hub id ("org/name" or "name")."""
    return (os.path.exists(path) or path.startswith(("/", ".", "~")) or path.count("/") > 1
            or os.path.splitext(path)[1] in BUILDERS)


def _load_dataset(path: str):
    import datasets

    datasets.disable_progress_bars()
    if not os.path.exists(path):
        return _load_hub(path)
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ConfigError(f"data.path {path!r} is empty")
    try:
        return _load_local(path)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files
        raise ConfigError(f"data.path {path!r} could not be read: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from None


def _load_local(path: str):
    import datasets

    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in BUILDERS:
            raise ConfigError(f"data.path {path!r}: unsupported file type {ext!r}; use one of {', '.join(BUILDERS)}")
        return datasets.load_dataset(BUILDERS[ext], data_files=path, split="train")
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names
                   if os.path.splitext(f)[1].lower() in BUILDERS)
    if not files:
        raise ConfigError(f"data.path {path!r}: the folder holds no {', '.join(BUILDERS)} files")
    kinds = {BUILDERS[os.path.splitext(f)[1].lower()] for f in files}
    if len(kinds) > 1:
        raise ConfigError(f"data.path {path!r}: mixed file types {sorted(kinds)}; keep one kind per folder")
    return datasets.load_dataset(kinds.pop(), data_files=files, split="train")


def _load_hub(path: str):
    import datasets

    if looks_local(path):
        raise ConfigError(f"data.path {path!r} does not exist (expected a local file or folder, or a hub id)")
    try:
        return datasets.load_dataset(path, split="train")
    except Exception as e:  # noqa: BLE001 - hub ids fail offline with many exception types
        raise ConfigError(f"data.path {path!r} is neither a local file/folder nor a loadable hub dataset: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_sequences(data: DataConfig, *, tokenizer_path: str | None, revision: str | None = None) -> torch.Tensor:
    """All fixed-length sequences of the data, in order: [N, seq_len] int64."""
    ds = _load_dataset(data.path)
    if len(ds) == 0:
        raise ConfigError(f"data.path {data.path!r} is empty")
    if "input_ids" in ds.column_names:
        rows = ds["input_ids"]
        lengths = {len(r) for r in rows}
        if len(lengths) != 1:
            raise ConfigError(f"data.path {data.path!r}: input_ids rows have unequal lengths "
                              f"({min(lengths)}..{max(lengths)}); pre-chunk them to one length")
        (length,) = lengths
        if length != data.seq_len:
            raise ConfigError(f"data.seq_len={data.seq_len} but the input_ids rows of {data.path!r} have length "
                              f"{length}; set data.seq_len={length}")
        return torch.tensor(rows, dtype=torch.int64)
    if data.text_column not in ds.column_names:
        raise ConfigError(f"data.text_column={data.text_column!r} is not a column of {data.path!r}; "
                          f"columns: {', '.join(ds.column_names)}")
    if data.tokenizer:
        tokenizer_path, key, revision = data.tokenizer, "data.tokenizer", None
    else:
        key = "model.path"
    if not tokenizer_path:
        raise ConfigError("text data needs a tokenizer: set data.tokenizer (or model.path) to a folder or hub id "
                          "with one, or give data with an input_ids column")
    tokenizer = load_tokenizer(tokenizer_path, revision=revision, key=key)
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in ds[data.text_column]:
        if text:
            ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
            if eos is not None:
                ids.append(eos)
    usable = len(ids) // data.seq_len * data.seq_len
    return torch.tensor(ids[:usable], dtype=torch.int64).reshape(-1, data.seq_len)


def analysis_batches(sequences: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """The first num_batches * batch_size sequences (after an optional seeded shuffle): [B, batch, seq_len]."""
    needed = data.num_batches * data.batch_size
    if sequences.shape[0] < needed:
        raise ConfigError(f"data.path {data.path!r} gives {sequences.shape[0]} sequences of {data.seq_len} tokens, "
                          f"fewer than data.num_batches * data.batch_size = {needed}")
    if data.shuffle_seed is not None:
        order = torch.randperm(sequences.shape[0], generator=torch.Generator().manual_seed(data.shuffle_seed))
        sequences = sequences[order]
    return sequences[:needed].reshape(data.num_batches, data.batch_size, data.seq_len).contiguous()
