"""The analysis set from a local file or folder or a hub dataset, via HF datasets, reading only what it needs.

Rows are streamed (``streaming=True``) and tokenized one by one until ``num_batches * batch_size`` sequences
are complete; only a ``shuffle_seed`` reads the whole source (a shuffle needs every sequence). Samples are
text (``text_column``) or chat conversations (``messages_column`` rendered with the tokenizer's chat template),
or pre-tokenized ``input_ids`` (Hugging Face layout: optional ``attention_mask`` and ``labels`` columns, whose
padding and -100 do not count). ``format: chat`` reads only the messages column, even where the source also
has ``input_ids``. With ``packing`` samples are joined (text samples end with EOS) and cut into ``seq_len``
sequences (pre-tokenized rows must already be ``seq_len`` long); without it each sample is one sequence,
truncated or right-padded with an attention mask. ``loss: masked`` labels only the assistant turns of chat
samples (the rest is -100). A value of the wrong kind is refused naming its column and row, never cast.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from hessian_core.loss import IGNORE_INDEX, BatchSet

from .config import ConfigError, DataConfig
from .sanity import load_tokenizer

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}


def looks_local(path: str) -> bool:
    """A path meant as a local file or folder rather than a hub id ("org/name" or "name")."""
    return (os.path.exists(path) or path.startswith(("/", ".", "~")) or path.count("/") > 1
            or os.path.splitext(path)[1] in BUILDERS)


TOKEN_COLUMNS = ("input_ids", "attention_mask", "labels")  # pre-tokenized data, Hugging Face layout


@dataclass
class Sample:
    ids: list[int]
    labels: list[int] | None  # None: every token counts
    mask: list[int] | None = None  # a pre-tokenized attention_mask; None: every token is attended


@dataclass
class ReadStats:
    """What a read cost: rows taken from the source and sequences made (the "only what is needed" figures)."""

    rows: int = 0
    sequences: int = 0


# -- opening the source ----------------------------------------------------------------------------------------

def _one_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _local_kind(path: str) -> str:
    if os.path.isfile(path):
        if os.path.getsize(path) == 0:
            raise ConfigError(f"data.path {path!r} is empty")
        ext = os.path.splitext(path)[1].lower()
        if ext not in BUILDERS:
            raise ConfigError(f"data.path {path!r}: unsupported file type {ext!r}; use one of {', '.join(BUILDERS)}")
        return BUILDERS[ext]
    files = [f for _, _, names in os.walk(path) for f in names if os.path.splitext(f)[1].lower() in BUILDERS]
    if not files:
        raise ConfigError(f"data.path {path!r}: the folder holds no {', '.join(BUILDERS)} files")
    kinds = {BUILDERS[os.path.splitext(f)[1].lower()] for f in files}
    if len(kinds) > 1:
        raise ConfigError(f"data.path {path!r}: mixed file types {sorted(kinds)}; keep one kind per folder")
    return kinds.pop()


def open_source(data: DataConfig, *, streaming: bool):
    """The split as a datasets (Iterable)Dataset. A file is one 'train' split; a folder's splits come from its file
    names (train-*.jsonl, validation/...); a hub id takes ``data.name`` and ``data.split``."""
    import datasets

    datasets.disable_progress_bars()
    path = data.path
    if os.path.exists(path):
        kind = _local_kind(path)
        if os.path.isfile(path):
            if data.split != "train" or data.name:
                raise ConfigError(f"data.path {path!r} is one file, i.e. one 'train' split with no configs; "
                                  f"data.split/data.name apply to folders and hub datasets")
            args, kwargs = (kind,), {"data_files": path}
        else:
            args, kwargs = (path,), {"name": data.name}
    elif looks_local(path):
        raise ConfigError(f"data.path {path!r} does not exist (expected a local file or folder, or a hub id)")
    else:
        args, kwargs = (path,), {"name": data.name}
    try:
        return datasets.load_dataset(*args, **kwargs, split=data.split, streaming=streaming)
    except ValueError as e:
        if "split" in str(e).lower():
            raise ConfigError(f"data.split={data.split!r} is not a split of {path!r}: {_one_line(e)}") from None
        raise ConfigError(f"data.path {path!r} could not be read: {_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - datasets raises many types for unreadable files and offline hub ids
        raise ConfigError(f"data.path {path!r} could not be read (as a local file/folder or hub dataset): "
                          f"{type(e).__name__}: {_one_line(e)}") from None


def _rows(ds, data: DataConfig) -> Iterator[dict]:
    """Rows of the source; read errors (streaming reads lazily) become one-line ConfigErrors."""
    it = iter(ds)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"data.path {data.path!r} could not be read: {type(e).__name__}: {_one_line(e)}") from None
        yield row


# -- samples ---------------------------------------------------------------------------------------------------

def chat_sample(tokenizer, messages: list[dict], *, masked: bool) -> Sample:
    """One conversation rendered with the chat template; with ``masked`` only assistant turns are labelled.

    A token is an assistant token when it starts inside an assistant turn's characters: from the end of the
    rendering of the turns before it with the generation prompt, to the end of the rendering through it (its
    content and end-of-turn marker). The template must render each prefix of a conversation as a prefix."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if not masked:
        return Sample(list(enc["input_ids"]), None)
    spans = []
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ConfigError("data.format=chat: the tokenizer's chat template does not render a conversation's "
                              "turns as prefixes of it, so assistant tokens cannot be located; use data.loss=causal_lm")
        spans.append((len(before), len(through)))
    labels = [tok if any(lo <= start < hi for lo, hi in spans) else IGNORE_INDEX
              for tok, (start, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return Sample(list(enc["input_ids"]), labels)


def _tokenizer(data: DataConfig, tokenizer_path: str | None, revision: str | None, *, chat: bool):
    """data.tokenizer's, else the model's (``tokenizer_path``); refused when missing or without a vocabulary."""
    key = "model.path"
    if data.tokenizer:
        tokenizer_path, key, revision = data.tokenizer, "data.tokenizer", None
    if not tokenizer_path:
        raise ConfigError("text data needs a tokenizer: set data.tokenizer (or model.path) to a folder or hub id "
                          "with one, or give data with an input_ids column")
    tokenizer = load_tokenizer(tokenizer_path, revision=revision, key=key)
    if chat and not tokenizer.chat_template:
        raise ConfigError(f"data.format=chat: the tokenizer of {tokenizer_path!r} has no chat template")
    if chat and not tokenizer.is_fast:
        raise ConfigError(f"data.format=chat needs a fast tokenizer (offsets); {tokenizer_path!r} has a slow one")
    return tokenizer


def pretokenized(data: DataConfig, columns: list[str]) -> bool:
    """Whether the source is read as token ids: it has ``input_ids`` and ``format`` is not ``chat`` (an explicit
    chat format reads its messages column, so an ``input_ids`` column beside it never overrides a masked loss)."""
    return "input_ids" in columns and data.format != "chat"


def _where(data: DataConfig, column: str, row: int) -> str:
    return f"data.path {data.path!r}, column {column!r}, row {row} (counting from 0)"


def _kind(value) -> str:
    return "null" if value is None else f"{type(value).__name__} {repr(value)[:40]}"


def _int_list(value, data: DataConfig, column: str, row: int) -> list[int]:
    """A pre-tokenized column's list of integers. Anything else is refused, never cast: a float id truncated to
    an int, or a boolean taken as 0/1, would be analysed as another token."""
    if isinstance(value, (list, tuple)) and all(type(t) is int for t in value):
        return list(value)
    if isinstance(value, (list, tuple)):
        bad = next(t for t in value if type(t) is not int)
        got = f"an element {bad!r} ({type(bad).__name__})"
    else:
        got = _kind(value)
    raise ConfigError(f"{_where(data, column, row)}: expected a list of integers, got {got}; token columns must "
                      f"hold integers (floats and booleans are not cast)")


def _token_sample(row: dict, data: DataConfig, columns: list[str], index: int) -> Sample:
    """One pre-tokenized row: ``input_ids`` and, where the source has them, ``attention_mask`` (1 attended, 0
    padding) and ``labels`` (aligned with input_ids; -100 not counted)."""
    ids = _int_list(row["input_ids"], data, "input_ids", index)
    extra = {c: _int_list(row[c], data, c, index) for c in TOKEN_COLUMNS[1:] if c in columns}
    for column, values in extra.items():
        if len(values) != len(ids):
            raise ConfigError(f"{_where(data, column, index)}: {len(values)} values for {len(ids)} input_ids; "
                              f"the columns must be aligned")
        valid = (lambda t: t in (0, 1)) if column == "attention_mask" else (lambda t: t >= 0 or t == IGNORE_INDEX)
        bad = next((t for t in values if not valid(t)), None)
        if bad is not None:
            want = "0 (padding) or 1" if column == "attention_mask" else f"a token id >= 0 or {IGNORE_INDEX} (ignored)"
            raise ConfigError(f"{_where(data, column, index)}: value {bad}; expected {want}")
    return Sample(ids, extra.get("labels"), extra.get("attention_mask"))


def _conversation(value, data: DataConfig, index: int) -> list[dict]:
    """A chat row's messages: a list of {role, content} objects, with an assistant turn under a masked loss."""
    where = _where(data, data.messages_column, index)
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list of messages ({{role, content}} objects), got {_kind(value)}")
    for k, m in enumerate(value):
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: message {k} is {_kind(m)}, not a {{role, content}} object")
        if not isinstance(m.get("role"), str):
            raise ConfigError(f"{where}: message {k} has no 'role' string (expected system, user, assistant, ...)")
    if data.loss == "masked" and not any(m["role"] == "assistant" for m in value):
        raise ConfigError(f"{where}: no assistant turn, so data.loss=masked would count none of its tokens; drop "
                          f"the row or use data.loss=causal_lm")
    return value


def samples(rows: Iterator[dict], data: DataConfig, columns: list[str], *, tokenizer_path: str | None,
            revision: str | None) -> Iterator[Sample]:
    """Samples in source order, tokenized one row at a time (a generator: nothing past what is consumed)."""
    if pretokenized(data, columns):
        for index, row in enumerate(rows):
            yield _token_sample(row, data, columns, index)
        return
    chat = data.format == "chat"
    column = data.messages_column if chat else data.text_column
    if column not in columns:
        key = "data.messages_column" if chat else "data.text_column"
        raise ConfigError(f"{key}={column!r} is not a column of {data.path!r}; columns: {', '.join(columns)}")
    tokenizer = _tokenizer(data, tokenizer_path, revision, chat=chat)
    eos = tokenizer.eos_token_id
    for index, row in enumerate(rows):
        value = row[column]
        if value is None or (chat and value == []):
            continue
        if chat:
            yield chat_sample(tokenizer, _conversation(value, data, index), masked=data.loss == "masked")
        elif not isinstance(value, str):
            raise ConfigError(f"{_where(data, column, index)}: expected text (a string), got {_kind(value)}")
        elif value:
            ids = tokenizer(value, add_special_tokens=False)["input_ids"]
            yield Sample(ids + ([eos] if eos is not None else []), None)


# -- sequences -------------------------------------------------------------------------------------------------

@dataclass
class Sequences:
    """Fixed-length sequences [N, seq_len] with optional attention mask and labels."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None


def _packed(stream: Iterator[Sample], seq_len: int, limit: int | None, stats: ReadStats) -> Sequences:
    ids: list[int] = []
    labels: list[int] = []
    any_labels = False
    for s in stream:
        stats.rows += 1
        ids.extend(s.ids)
        labels.extend(s.ids if s.labels is None else s.labels)
        any_labels |= s.labels is not None
        if limit is not None and len(ids) >= limit * seq_len:
            break
    n = len(ids) // seq_len if limit is None else min(len(ids) // seq_len, limit)
    cut = n * seq_len
    out = Sequences(torch.tensor(ids[:cut], dtype=torch.int64).reshape(n, seq_len))
    if any_labels:
        out.labels = torch.tensor(labels[:cut], dtype=torch.int64).reshape(n, seq_len)
    return out


def _padded(stream: Iterator[Sample], seq_len: int, limit: int | None, pad_id: int, stats: ReadStats) -> Sequences:
    """One sample per sequence: truncated to seq_len, right-padded; samples that count no target are skipped."""
    rows_ids, rows_mask, rows_labels = [], [], []
    for s in stream:
        stats.rows += 1
        ids = s.ids[:seq_len]
        labels = (s.ids if s.labels is None else s.labels)[:seq_len]
        mask = [1] * len(ids) if s.mask is None else s.mask[:seq_len]
        if len(ids) < 2 or all(t == IGNORE_INDEX or m == 0 for t, m in zip(labels[1:], mask[1:])):
            continue
        pad = seq_len - len(ids)
        rows_ids.append(ids + [pad_id] * pad)
        rows_mask.append(mask + [0] * pad)
        rows_labels.append(labels + [IGNORE_INDEX] * pad)
        if limit is not None and len(rows_ids) >= limit:
            break
    shape = (len(rows_ids), seq_len)
    return Sequences(torch.tensor(rows_ids, dtype=torch.int64).reshape(shape),
                     torch.tensor(rows_mask, dtype=torch.int64).reshape(shape),
                     torch.tensor(rows_labels, dtype=torch.int64).reshape(shape))


def _pad_id(tokenizer_path: str | None, revision: str | None) -> int:
    if not tokenizer_path:
        return 0
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(tokenizer_path, revision=revision)
    except Exception:  # noqa: BLE001 - pre-tokenized data with a model folder that has no tokenizer
        return 0
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return 0 if pad is None else int(pad)


def read_sequences(data: DataConfig, *, tokenizer_path: str | None, revision: str | None = None,
                   stats: ReadStats | None = None) -> Sequences:
    """The sequences the analysis needs: the first num_batches * batch_size (all of them with a shuffle_seed)."""
    stats = stats if stats is not None else ReadStats()
    needed = data.num_batches * data.batch_size
    limit = needed if data.shuffle_seed is None else None
    ds = open_source(data, streaming=limit is not None)
    columns = list(ds.column_names or [])  # a stream of json may not know its columns before its first row
    rows = _rows(ds, data)
    first = next(rows, None)
    if first is None:
        raise ConfigError(f"data.path {data.path!r} is empty")
    columns = columns or list(first)

    def all_rows():
        yield first
        yield from rows

    stream = samples(all_rows(), data, columns, tokenizer_path=tokenizer_path, revision=revision)
    if data.packing:
        if pretokenized(data, columns):
            return _pretokenized(stream, data, limit, stats)
        out = _packed(stream, data.seq_len, limit, stats)
    else:
        out = _padded(stream, data.seq_len, limit, _pad_id(data.tokenizer or tokenizer_path, revision), stats)
    stats.sequences = out.input_ids.shape[0]
    return out


def _pretokenized(stream: Iterator[Sample], data: DataConfig, limit: int | None, stats: ReadStats) -> Sequences:
    """Pre-tokenized rows of seq_len tokens as they are, with their attention_mask / labels where given."""
    rows: list[Sample] = []
    for s in stream:
        stats.rows += 1
        rows.append(s)
        if limit is not None and len(rows) >= limit:
            break
    lengths = {len(r.ids) for r in rows}
    if len(lengths) != 1:
        raise ConfigError(f"data.path {data.path!r}: input_ids rows have unequal lengths "
                          f"({min(lengths)}..{max(lengths)}); pre-chunk them to one length or set data.packing=false")
    (length,) = lengths
    if length != data.seq_len:
        raise ConfigError(f"data.seq_len={data.seq_len} but the input_ids rows of {data.path!r} have length "
                          f"{length}; set data.seq_len={length}")
    stats.sequences = len(rows)

    def column(values: list[list[int] | None]) -> torch.Tensor | None:
        return None if values[0] is None else torch.tensor(values, dtype=torch.int64)

    return Sequences(column([r.ids for r in rows]), column([r.mask for r in rows]), column([r.labels for r in rows]))


def load_sequences(data: DataConfig, *, tokenizer_path: str | None, revision: str | None = None) -> torch.Tensor:
    """The input_ids of ``read_sequences`` [N, seq_len] (text, packed, unmasked: what a plain run needs)."""
    return read_sequences(data, tokenizer_path=tokenizer_path, revision=revision).input_ids


def analysis_set(sequences: Sequences | torch.Tensor, data: DataConfig) -> torch.Tensor | BatchSet:
    """The first num_batches * batch_size sequences (after an optional seeded shuffle), [B, batch, seq_len]: a
    tensor of input_ids when nothing is masked, else a BatchSet with attention_mask / labels."""
    if isinstance(sequences, torch.Tensor):
        sequences = Sequences(sequences)
    needed = data.num_batches * data.batch_size
    count = sequences.input_ids.shape[0]
    if count < needed:
        raise ConfigError(f"data.path {data.path!r} gives {count} sequences of {data.seq_len} tokens, "
                          f"fewer than data.num_batches * data.batch_size = {needed}")
    order = torch.arange(count)
    if data.shuffle_seed is not None:
        order = torch.randperm(count, generator=torch.Generator().manual_seed(data.shuffle_seed))
    shape = (data.num_batches, data.batch_size, data.seq_len)

    def take(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[order][:needed].reshape(shape).contiguous()

    ids, mask, labels = take(sequences.input_ids), take(sequences.attention_mask), take(sequences.labels)
    return ids if mask is None and labels is None else BatchSet(ids, attention_mask=mask, labels=labels)


def analysis_batches(sequences: torch.Tensor, data: DataConfig) -> torch.Tensor:
    """The unmasked analysis set as [num_batches, batch_size, seq_len] input_ids."""
    out = analysis_set(sequences, data)
    return out if isinstance(out, torch.Tensor) else out.input_ids
