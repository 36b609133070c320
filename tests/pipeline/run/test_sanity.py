"""A meaningless analysis set or a model that would fail late is refused before Ray: no tokenizer for text
data, one repeated token, sequences beyond the model's context, negative ids, a corrupt weight file, an absurd
number of Lanczos steps; and a full disk is reported as such, naming the file."""

import errno
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hessian_core import files as hfiles
from hessian_core.files import atomic_text
from pipeline.cli import main
from pipeline_fixtures import write_config, write_input_ids, write_model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("sanity")
    gpt2 = tmp / "gpt2"  # save_pretrained only: no tokenizer files
    GPT2LMHeadModel(GPT2Config(n_embd=8, n_layer=1, n_head=2, n_positions=16, vocab_size=64)).save_pretrained(gpt2)
    llama = tmp / "llama"
    LlamaForCausalLM(LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                 intermediate_size=16, vocab_size=64, max_position_embeddings=16)).save_pretrained(llama)
    text = tmp / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"line {i} of some plain text"}) + "\n" for i in range(200)))
    neox = write_model(str(tmp / "neox"))
    corrupt = tmp / "corrupt"
    corrupt.mkdir()
    for name in os.listdir(neox):
        data = open(os.path.join(neox, name), "rb").read()
        (corrupt / name).write_bytes(data[: len(data) // 2] if name.endswith(".safetensors") else data)

    def ids(name, rows):
        pq.write_table(pa.table({"input_ids": rows}), tmp / name)
        return str(tmp / name)

    return {"gpt2": str(gpt2), "llama": str(llama), "text": str(text), "neox": neox, "corrupt": str(corrupt),
            "one_token": ids("one.parquet", [[5] * 8] * 8),
            "negative": ids("neg.parquet", [[1, 2, 3, -4, 5, 6, 7, 8]] + [list(range(8))] * 7),
            "long": ids("long.parquet", [[(i + j) % 60 for j in range(32)] for i in range(8)])}


CASES = [
    ("gpt2", "text", {}, ["no tokenizer files", "data.tokenizer", "input_ids"]),
    ("llama", "text", {}, ["tokenizer", "input_ids"]),
    ("neox", "one_token", {}, ["degenerate", "1 distinct token"]),
    ("neox", "negative", {}, ["token id -4", ">= 0"]),
    ("gpt2", "long", {"seq_len": 32}, ["data.seq_len=32", "context of 16"]),
    ("llama", "long", {"seq_len": 32}, ["data.seq_len=32", "context of 16"]),
    ("corrupt", "one_token", {}, ["model.safetensors", "corrupt"]),
    ("neox", "one_token", {"steps": 1_000_000_000}, ["lanczos.steps must be <= 10000 or 'auto', got 1000000000", "orthogonality"]),
]


@pytest.mark.parametrize("model,data,sets,expected", CASES, ids=[f"{c[0]}-{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_refused_before_ray(assets, model, data, sets, expected, tmp_path, capsys, no_ray):
    config = write_config(str(tmp_path / "c.yaml"), model=assets[model], data=assets[data],
                          output_dir=str(tmp_path / "out"))
    overrides = []
    if "seq_len" in sets:
        overrides += ["--set", f"data.seq_len={sets['seq_len']}"]
    if "steps" in sets:
        overrides += ["--set", f"lanczos.steps={sets['steps']}"]
    assert main(["run", config] + overrides) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, err


def test_text_with_a_separate_tokenizer_folder_is_used(assets, tmp_path):
    """data.tokenizer supplies the tokenizer a model folder lacks; a distinct-token count shows it worked."""
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {chr(c): i for i, c in enumerate(range(97, 123))} | {"[UNK]": 26, " ": 27}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="[UNK]").save_pretrained(tmp_path / "tok")
    from pipeline.run.config import load_config
    from pipeline.run.preflight import preflight

    config = write_config(str(tmp_path / "c.yaml"), model=assets["gpt2"], data=assets["text"],
                          output_dir=str(tmp_path / "out"))
    prepared = preflight(load_config(config, [f"data.tokenizer={tmp_path / 'tok'}"]))
    assert prepared.batches.unique().numel() > 5


def test_disk_full_names_the_path(tmp_path, monkeypatch):
    """A writer failing on a full disk with an unhelpful error (torch.save: 'unexpected pos') is reported as
    ENOSPC with the file's path; an OSError ENOSPC keeps its errno and gains the path."""
    target = str(tmp_path / "ckpt.pt")

    def failing(tmp):
        open(tmp, "wb").write(b"x" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:783] . unexpected pos 1216 vs 1110")

    monkeypatch.setattr(hfiles, "_free_bytes", lambda folder: 0)
    with pytest.raises(OSError) as info:
        hfiles.atomic_write(target, failing)
    assert info.value.errno == errno.ENOSPC and target in str(info.value) and "No space left" in str(info.value)
    assert os.listdir(tmp_path) == []

    def enospc(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hfiles, "_free_bytes", lambda folder: 10**9)
    with pytest.raises(OSError) as info:
        hfiles.atomic_write(target, enospc)
    assert info.value.errno == errno.ENOSPC and target in str(info.value)
    with pytest.raises(RuntimeError):  # with room on the disk an error stays what it is
        hfiles.atomic_write(target, failing)
    atomic_text(target, "ok")
    assert open(target).read() == "ok"


def test_auto_address_to_a_dead_cluster_is_refused_before_ray(assets, tmp_path, capsys, monkeypatch, no_ray):
    """A killed `ray start` leaves its address file; `auto` (or RAY_ADDRESS) pointing at nothing is refused in
    seconds, naming where the address came from, instead of Ray retrying for minutes."""
    import ray._private.utils as ray_utils

    from actors.worker import free_port

    dead = f"127.0.0.1:{free_port()}"
    config = write_config(str(tmp_path / "c.yaml"), model=assets["neox"],
                          data=write_input_ids(str(tmp_path / "ids.parquet")), output_dir=str(tmp_path / "out"),
                          cluster={"address": "auto"})
    overrides = []
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_utils, "read_ray_address", lambda temp_dir=None: dead)
    assert main(["run", config] + overrides) == 2
    err = capsys.readouterr().err
    assert "address file" in err and dead in err and "unreachable" in err, err
    monkeypatch.setenv("RAY_ADDRESS", dead)
    assert main(["run", config, "--set", "cluster.address=null"] + overrides) == 2
    err = capsys.readouterr().err
    assert "RAY_ADDRESS" in err and dead in err, err
