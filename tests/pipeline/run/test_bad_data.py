"""Data values of the wrong kind are refused before Ray or a model load: exit 2 and one line naming the file, the
column and the row (chat messages that are not conversations, texts that are not strings, token ids that are not
integers, a masked conversation without an assistant turn), never cast or analysed."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_fixtures import make_tokenizer, write_jsonl
from helpers import make_batches, make_tiny_model
from pipeline.cli import main
from pipeline_fixtures import SEQ_LEN, write_config

TURN = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "fine thanks"}]
IDS = make_batches(num_batches=1, batch_size=8, seq_len=SEQ_LEN, seed=7)[0].tolist()
CHAT = ["data.format=chat"]
MASKED = CHAT + ["data.loss=masked"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad-data")
    make_tiny_model("gpt_neox", train_steps=0).save_pretrained(tmp / "model")  # only its config and headers are read
    return str(tmp / "model"), make_tokenizer(str(tmp / "tok"))


# (id, file name, rows as {column: values}, --set overrides, what the one line must name besides the file)
CASES = [
    ("messages-dict", "c.jsonl", {"messages": [{"role": "user", "content": "hi"}] * 2}, CHAT,
     ["'messages'", "row 0", "dict"]),
    ("messages-string", "c.jsonl", {"messages": ["hi there"] * 2}, CHAT, ["'messages'", "row 0", "str"]),
    ("messages-lists", "c.jsonl", {"messages": [[["user", "hi"], ["assistant", "ok"]]] * 2}, CHAT,
     ["'messages'", "row 0", "message 0", "list"]),
    ("masked-no-assistant", "c.jsonl", {"messages": [TURN, TURN[:1]]}, MASKED,
     ["'messages'", "row 1", "no assistant turn", "data.loss=masked"]),
    ("masked-no-role", "c.jsonl", {"messages": [TURN, [{"content": "hi"}, TURN[1]]]}, MASKED,
     ["'messages'", "row 1", "message 0", "'role'"]),
    ("text-ints", "t.parquet", {"text": [3, 4]}, [], ["'text'", "row 0", "int"]),
    ("text-lists", "t.parquet", {"text": [["the", "cat"], ["a"]]}, [], ["'text'", "row 0", "list"]),
    ("input-ids-null", "p.parquet", {"input_ids": IDS[:2] + [None] + IDS[3:]}, [], ["'input_ids'", "row 2", "null"]),
    ("input-ids-strings", "p.parquet", {"input_ids": [[str(t) for t in r] for r in IDS]}, [],
     ["'input_ids'", "row 0", "str"]),
    ("input-ids-floats", "p.parquet", {"input_ids": [[t + 0.7 for t in r] for r in IDS]}, [],
     ["'input_ids'", "row 0", "float"]),
    ("input-ids-booleans", "p.parquet", {"input_ids": [[t % 2 == 0 for t in r] for r in IDS]}, [],
     ["'input_ids'", "row 0", "bool"]),
    ("labels-floats", "p.parquet", {"input_ids": IDS, "labels": [[float(t) for t in r] for r in IDS]}, [],
     ["'labels'", "row 0", "float"]),
    ("mask-not-0-or-1", "p.parquet", {"input_ids": IDS, "attention_mask": [[2] * SEQ_LEN] * len(IDS)}, [],
     ["'attention_mask'", "row 0", "value 2"]),
    ("negative-padding-id", "p.parquet", {"input_ids": [r[:6] + [-1, -1] for r in IDS],
                                           "attention_mask": [[1] * 6 + [0, 0]] * len(IDS)}, [], ["token id -1"]),
    ("nothing-counted", "p.parquet", {"input_ids": IDS, "labels": [[-100] * SEQ_LEN] * len(IDS)}, [],
     ["counts no token"]),
]


def write_rows(path: str, columns: dict) -> str:
    if path.endswith(".jsonl"):
        (name, values), = columns.items()
        return write_jsonl(path, [{name: v} for v in values])
    pq.write_table(pa.table(columns), path)
    return path


@pytest.mark.parametrize("name,file,columns,sets,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_data_exits_2_naming_file_column_and_row(assets, name, file, columns, sets, expected, tmp_path, capsys,
                                                     no_ray):
    model, tokenizer = assets
    data = write_rows(str(tmp_path / file), columns)
    config = write_config(str(tmp_path / "c.yaml"), model=model, data=data, output_dir=str(tmp_path / "out"))
    started = time.monotonic()
    code = main(["run", config, "--set", f"data.tokenizer={tokenizer}"] + [a for s in sets for a in ("--set", s)])
    assert time.monotonic() - started < 30
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert os.path.basename(data) in err and all(e in err for e in expected), err
