"""data.* options: chat format with assistant-only labels, padding without packing, splits, and lazy reading."""

from __future__ import annotations

import pytest
import torch

from data_fixtures import ids, make_tokenizer, write_jsonl
from hessian_core import BatchSet, counted_tokens
from hessian_core.loss import rank_batches
from pipeline.run.config import ConfigError, DataConfig, load_config
from pipeline.run.data import ReadStats, analysis_set, read_sequences

CONVERSATION = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi how are you"},
                {"role": "assistant", "content": "fine thanks"}, {"role": "user", "content": "bye"},
                {"role": "assistant", "content": "ok bye"}]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_chat_masks_everything_but_the_assistant_turns_token_by_token(tokenizer_dir, tmp_path):
    path = write_jsonl(str(tmp_path / "chat.jsonl"), [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}])
    data = DataConfig(path=path, format="chat", loss="masked", packing=False, seq_len=24, batch_size=2)
    seqs = read_sequences(data, tokenizer_path=tokenizer_dir)
    rendered = ("<system> be brief <end> <user> hi how are you <end> <assistant> fine thanks <end> "
                "<user> bye <end> <assistant> ok bye <end>")
    counted = [0] * 11 + [1, 1, 1] + [0] * 4 + [1, 1, 1]  # "fine thanks <end>", "ok bye <end>"
    want_ids = ids(rendered)
    assert len(counted) == len(want_ids) == 21
    row = seqs.input_ids[0].tolist()
    assert row[:21] == want_ids and row[21:] == [0, 0, 0]  # right-padded with <pad>
    assert seqs.attention_mask[0].tolist() == [1] * 21 + [0] * 3
    want_labels = [t if c else -100 for t, c in zip(want_ids, counted)] + [-100] * 3
    assert seqs.labels[0].tolist() == want_labels  # the assistant contents and their <end>, nothing else
    second = ids("<user> hi how are you <end> <assistant> fine thanks <end>")
    assert seqs.labels[1].tolist() == [-100] * 7 + second[7:] + [-100] * 14

    batches = analysis_set(seqs, DataConfig(path=path, seq_len=24, batch_size=2, num_batches=1))
    assert isinstance(batches, BatchSet)
    (batch,) = rank_batches(batches, 0, 1)
    assert counted_tokens(batch) == 6 + 3


def test_chat_packing_and_unmasked_chat(tokenizer_dir, tmp_path):
    path = write_jsonl(str(tmp_path / "chat.jsonl"), [{"messages": CONVERSATION}] * 3)
    packed = read_sequences(DataConfig(path=path, format="chat", loss="masked", seq_len=11, batch_size=4),
                            tokenizer_path=tokenizer_dir)
    assert packed.input_ids.shape == (4, 11) and packed.attention_mask is None
    flat_labels = packed.labels.reshape(-1).tolist()
    assert sum(t != -100 for t in flat_labels) == 2 * 6  # 44 tokens: 2 conversations of 21 and 2 system tokens
    plain = read_sequences(DataConfig(path=path, format="chat", seq_len=11, batch_size=4), tokenizer_path=tokenizer_dir)
    assert plain.labels is None and torch.equal(plain.input_ids, packed.input_ids)


def test_text_without_packing_is_padded_with_a_mask(tokenizer_dir, tmp_path):
    path = write_jsonl(str(tmp_path / "t.jsonl"), [{"text": "the cat sat"}, {"text": "the cat sat on the mat"},
                                                   {"text": "a"}, {"text": "a cat"}])
    seqs = read_sequences(DataConfig(path=path, packing=False, seq_len=5, batch_size=3), tokenizer_path=tokenizer_dir)
    assert seqs.input_ids.tolist() == [ids("the cat sat <eos> <pad>"), ids("the cat sat on the"),  # truncated
                                       ids("a <eos> <pad> <pad> <pad>")]  # the 4th row is not read
    assert seqs.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1] * 5, [1, 1, 0, 0, 0]]
    assert seqs.labels.tolist()[0] == ids("the cat sat <eos>") + [-100]


def test_only_the_rows_needed_are_read(tokenizer_dir, tmp_path):
    path = write_jsonl(str(tmp_path / "big.jsonl"), [{"text": "the cat sat on the mat"}] * 5000)
    lazy, full = ReadStats(), ReadStats()
    data = DataConfig(path=path, seq_len=7, batch_size=4, num_batches=2)
    seqs = read_sequences(data, tokenizer_path=tokenizer_dir, stats=lazy)
    assert seqs.input_ids.shape == (8, 7) and lazy.rows == 8  # 7 tokens a row with EOS: one row a sequence
    shuffled = read_sequences(DataConfig(path=path, seq_len=7, batch_size=4, num_batches=2, shuffle_seed=0),
                              tokenizer_path=tokenizer_dir, stats=full)
    assert full.rows == 5000 and shuffled.input_ids.shape == (5000, 7)


def test_split_of_a_folder_and_bad_splits(tokenizer_dir, tmp_path):
    folder = tmp_path / "ds"
    write_jsonl(str(folder / "train.jsonl"), [{"text": "the cat sat on the mat"}] * 3)
    write_jsonl(str(folder / "validation.jsonl"), [{"text": "hi how are you"}] * 3)
    val = read_sequences(DataConfig(path=str(folder), split="validation", seq_len=5, batch_size=1),
                         tokenizer_path=tokenizer_dir)
    assert val.input_ids[0].tolist() == ids("hi how are you <eos>")
    train = read_sequences(DataConfig(path=str(folder), seq_len=5, batch_size=1), tokenizer_path=tokenizer_dir)
    assert train.input_ids[0].tolist() == ids("the cat sat on the")
    with pytest.raises(ConfigError, match="data.split='test'"):
        read_sequences(DataConfig(path=str(folder), split="test", seq_len=5, batch_size=1), tokenizer_path=tokenizer_dir)
    with pytest.raises(ConfigError, match="data.split/data.name apply to folders"):
        read_sequences(DataConfig(path=str(folder / "train.jsonl"), split="validation", seq_len=5, batch_size=1),
                       tokenizer_path=tokenizer_dir)


def test_config_refuses_masked_text_in_one_line():
    with pytest.raises(ConfigError, match="data.loss=masked .* data.format=chat"):
        load_config(None, ["model.path=x", "data.path=y", "data.loss=masked"])
    with pytest.raises(ConfigError, match="data.format"):
        load_config(None, ["model.path=x", "data.path=y", "data.format=html"])


def test_chat_format_reads_its_messages_beside_an_input_ids_column(tokenizer_dir, tmp_path):
    """The documented precedence: an explicit data.format=chat (masked) is never overridden by input_ids."""
    path = write_jsonl(str(tmp_path / "both.jsonl"), [{"messages": CONVERSATION[1:3], "input_ids": [9, 10, 11, 12]}])
    seqs = read_sequences(DataConfig(path=path, format="chat", loss="masked", packing=False, seq_len=12, batch_size=1),
                          tokenizer_path=tokenizer_dir)
    rendered = ids("<user> hi how are you <end> <assistant> fine thanks <end>")
    assert seqs.input_ids[0].tolist() == rendered + [0] * 2
    assert seqs.labels[0].tolist() == [-100] * 7 + rendered[7:] + [-100] * 2


def test_pretokenized_masks_and_labels_without_packing(tokenizer_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(tmp_path / "tok.parquet")
    pq.write_table(pa.table({"input_ids": [[7, 8, 9, 10, 0, 0], [11, 12, 13, 0, 0, 0], [14, 15, 16, 17, 18, 19]],
                             "attention_mask": [[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0], [1] * 6],
                             "labels": [[-100, -100, 9, 10, -100, -100], [-100] * 6, [-100, 15, 16, 17, 18, 19]]}),
                   path)
    seqs = read_sequences(DataConfig(path=path, packing=False, seq_len=5, batch_size=2), tokenizer_path=tokenizer_dir)
    assert seqs.input_ids.tolist() == [[7, 8, 9, 10, 0], [14, 15, 16, 17, 18]]  # row 1 counts no token: skipped
    assert seqs.attention_mask.tolist() == [[1, 1, 1, 1, 0], [1] * 5]
    assert seqs.labels.tolist() == [[-100, -100, 9, 10, -100], [-100, 15, 16, 17, 18]]
    (batch,) = rank_batches(analysis_set(seqs, DataConfig(path=path, seq_len=5, batch_size=2)), 0, 1)
    assert counted_tokens(batch) == 2 + 4
