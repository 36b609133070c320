"""Kernel benchmark on one GPU without Ray (the GPU machine has torch and transformers only).

Random-weight Pythia-160M-, Qwen3-0.6B- and Pythia-1B-shaped models in bfloat16 with SDPA, 4096 tokens per
analysis set: gradient, FD HVP (central, Richardson), exact HVP (double backward, math SDPA) and Lanczos vector
work, with peak memory (max_memory_allocated). Writes gpu_bench.json and prints a table.

    python bench/gpu_bench.py OUT_DIR [--repeats 3] [--models pythia-160m,qwen3-0.6b,pythia-1b]
    python bench/gpu_bench.py OUT_DIR --device cpu --tiny     # a seconds-long smoke run of the same code
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from hessian_core import default_eps  # noqa: E402
from hessian_core.profiling import measure_kernels  # noqa: E402

SHAPES = {
    "pythia-160m": dict(model_type="gpt_neox", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, vocab_size=50304, max_position_embeddings=4096),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, intermediate_size=3072, vocab_size=151936,
                       max_position_embeddings=4096, tie_word_embeddings=True),
    "pythia-1b": dict(model_type="gpt_neox", hidden_size=2048, num_hidden_layers=16, num_attention_heads=8,
                      intermediate_size=8192, vocab_size=50304, max_position_embeddings=4096),
}
TINY = dict(model_type="gpt_neox", hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=256, vocab_size=256, max_position_embeddings=64)


def build(shape: dict, *, device: torch.device, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(shape)
    config = AutoConfig.for_model(shape.pop("model_type"), **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default=",".join(SHAPES))
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="one tiny model, 2 x 32 tokens (smoke test)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    models = {"tiny": TINY} if args.tiny else {name: SHAPES[name] for name in args.models.split(",")}
    batch, seq = (2, 32) if args.tiny else (2, 2048)  # 4096 tokens
    rows = []
    for name, shape in models.items():
        started = time.perf_counter()
        model = build(shape, device=device, dtype=dtype)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, shape["vocab_size"], (batch, seq), generator=g).to(device)]
        eps = default_eps(dtype)
        try:
            for row in measure_kernels(model, batches, eps=eps, repeats=args.repeats):
                rows.append({"model": name, "tokens": batch * seq, **row})
                print(f"{name:<12} {row['kernel']:<24} {row['seconds']:9.4f}s {row['ratio_to_gradient']:6.2f}x "
                      f"peak {row['peak_mib']:9.0f} MiB", flush=True)
        except torch.OutOfMemoryError as e:
            rows.append({"model": name, "error": f"out of memory: {str(e).splitlines()[0]}"})
            print(f"{name}: out of memory", flush=True)
        del model, batches
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{name}: {time.perf_counter() - started:.0f}s", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    info = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "dtype": args.dtype, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": rows}
    with open(os.path.join(args.out_dir, "gpu_bench.json"), "w") as f:
        json.dump(info, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
