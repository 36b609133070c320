"""The Gauss-Newton product's peak host memory beyond the model's own passes, measured (VmHWM) on a 50k-vocabulary
model, against ``gauss_newton_extra_bytes`` and against what ``plan`` counts for it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_measured_extra_peak_matches_the_formula_and_the_plan():
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(TESTS), TESTS, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, os.path.join(TESTS, "gn_memory_worker.py"), "128", "256", "1024"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    logits_mib = got["tokens"] * got["vocab"] * 4 / 2**20
    # a gradient pass peaks in the loss's forward, holding 3 tokens x vocab tensors (the logits, their shifted
    # copy, the log-softmax) beside the model's activations; before its backward it holds no gradient
    activations = got["gradient_mib"] - 3 * logits_mib
    assert 0 <= activations <= 0.05 * logits_mib, got
    for chunk, row in got["gauss_newton"].items():
        # the product also holds its output (the gradient buffer it accumulates into) from the start
        extra = row["peak_mib"] - got["param_mib"] - activations
        assert abs(extra - row["formula_mib"]) <= 0.25 * row["formula_mib"], (chunk, extra, row, got)
    small, whole = got["gauss_newton"]["128"], got["gauss_newton"]["1024"]
    assert whole["peak_mib"] - small["peak_mib"] >= 0.5 * logits_mib  # chunking does cut the peak

    # plan (no weights: the architecture on fake tensors) for the same model and batch slice, at the default chunk:
    # the product's own peak (gauss_newton_peak: activations without the loss's tokens x vocab tensors, plus the J v
    # buffer, the logits and a chunk) and the output it accumulates into (the plan's gradient shard)
    from pipeline.run.config import load_config
    from pipeline.run.plan import gauss_newton_peak, plan_run

    architecture = {"model_type": "llama", "vocab_size": got["vocab"], "hidden_size": 64, "num_hidden_layers": 1,
                    "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 128,
                    "max_position_embeddings": 512, "tie_word_embeddings": False}
    config = load_config(None, ["model.init=random", f"model.config={json.dumps(architecture)}",
                                "data.path=builtin:demo", "data.seq_len=512", "data.batch_size=2",
                                "cluster.num_workers=1", "cluster.use_gpu=false", "lanczos.operator=gauss_newton"])
    plan = plan_run(config)
    planned = (gauss_newton_peak(config, plan.shape) + plan.shape.local_params * 4) / 2**20
    measured = got["gauss_newton"]["256"]["peak_mib"]
    assert abs(measured - planned) <= 0.25 * planned, (measured, planned)
    print(f"G v peak: measured {measured:.1f} MiB, planned {planned:.1f} MiB")
