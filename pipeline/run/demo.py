"""The built-in demo: a small GPT-NeoX trained briefly on the Python standard library's own source files.

Everything comes from this Python install (no download). The model is byte-level (vocab 256), saved with
``save_pretrained`` and the analysis set as a Parquet file of ``input_ids``, both cached; a config refers to
them as ``builtin:demo`` and they are then loaded by the ordinary loading code.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import sysconfig
import tempfile
import time

import torch

from hessian_core import causal_lm_loss

DEMO = "builtin:demo"
SEQ_LEN = 64
TRAIN_STEPS = 300
ANALYSIS_SEQUENCES = 256


def cache_dir() -> str:
    root = os.environ.get("HESSIAN_SPECTRUM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                     "hessian-spectrum")
    return os.path.join(root, "demo-v1")


def model_dir() -> str:
    return os.path.join(cache_dir(), "model")


def data_file() -> str:
    return os.path.join(cache_dir(), "data.parquet")


def _stdlib_bytes(limit: int) -> bytes:
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    out = bytearray()
    for path in files:
        with open(path, "rb") as f:
            out += f.read()
        if len(out) >= limit:
            break
    return bytes(out[:limit])


def _config():
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=256, max_position_embeddings=SEQ_LEN, rotary_pct=0.25,
                         hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                         bos_token_id=10, eos_token_id=10)


def architecture() -> dict:
    """The demo model's config as ``ModelSpec.config_overrides`` (with its ``model_type``)."""
    return _config().to_diff_dict()


def ensure_demo(log=print) -> tuple[str, str]:
    """Build (once) and return (model folder, data file). Written to a temporary folder, then renamed."""
    if os.path.exists(os.path.join(cache_dir(), "COMPLETE")):
        return model_dir(), data_file()
    import pyarrow as pa
    import pyarrow.parquet as pq
    from hessian_core.models import ModelSpec, build

    started = time.perf_counter()
    log(f"building the demo model in {cache_dir()} (once; about a minute on 2 cores)")
    text = torch.tensor(list(_stdlib_bytes(4_000_000)), dtype=torch.int64)
    usable = text.numel() // SEQ_LEN * SEQ_LEN
    seqs = text[:usable].reshape(-1, SEQ_LEN)
    analysis, train = seqs[:ANALYSIS_SEQUENCES], seqs[ANALYSIS_SEQUENCES:]
    model = build(ModelSpec(path=None, init="random", dtype="float32", config_overrides=architecture(), seed=0),
                  device="cpu", for_analysis=False)  # float32 training, as transformers builds it
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for step in range(TRAIN_STEPS):
        batch = train[torch.randint(0, train.shape[0], (32,), generator=g)]
        loss = causal_lm_loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == TRAIN_STEPS - 1:
            log(f"  demo training step {step}: loss {loss.item():.3f}")
    model.eval()
    parent = os.path.dirname(cache_dir())
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".demo-", dir=parent)
    model.save_pretrained(os.path.join(tmp, "model"))
    table = pa.table({"input_ids": pa.array(analysis.tolist(), type=pa.list_(pa.int64()))})
    pq.write_table(table, os.path.join(tmp, "data.parquet"))
    with open(os.path.join(tmp, "COMPLETE"), "w") as f:
        f.write(f"python {sys.version.split()[0]}, {TRAIN_STEPS} steps, final loss {loss.item():.4f}\n")
    if os.path.exists(cache_dir()):
        shutil.rmtree(cache_dir())
    os.rename(tmp, cache_dir())
    log(f"demo model ready ({time.perf_counter() - started:.0f}s)")
    return model_dir(), data_file()
