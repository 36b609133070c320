"""Host memory of loading a model on a group of gloo ranks on CPU: the full load (every rank reads the whole
model, then fully_shard frees what it does not own) against the sharded load (meta build, fully_shard,
each rank reads only its slices). No Ray: torch.multiprocessing ranks, as in the tests.

A random-weight Llama of about 100M parameters is saved once as index-sharded float32 safetensors. Each rank
imports everything first, then measures its load with ``actors.memory.PhaseMemory``: the kernel's RSS
high-water mark reset just before the load (``/proc/self/clear_refs``), so the figure is the peak growth
during the load alone. Writes load_memory.json and prints a table.

    python bench/load_memory.py OUT_DIR [--ranks 2] [--layers 11] [--hidden 768] [--vocab 16000]
"""

from __future__ import annotations

import argparse
import datetime
import math
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def build_and_save(folder: str, *, hidden: int, layers: int, vocab: int, shard_size: str) -> int:
    """A random float32 Llama saved with save_pretrained in several files; returns its parameter count."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         intermediate_size=int(hidden * 8 / 3) // 64 * 64, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    if not os.path.isfile(os.path.join(folder, "model.safetensors.index.json")):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(folder, max_shard_size=shard_size)
        del model
    from safetensors import safe_open

    total = 0
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="pt") as f:
                total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def rank_main(rank: int, world: int, port: int, folder: str, loading: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        from actors.memory import PhaseMemory
        from hessian_core.models import ModelSpec, import_model_code, load_for_rank
        from hessian_core import ParamSpace

        spec = ModelSpec(path=folder, loading=loading)
        import_model_code(spec)  # imports are not the load's cost (as in Worker.setup)
        dist.barrier()
        with PhaseMemory() as memory:
            model, how = load_for_rank(spec, device=torch.device("cpu"), world_size=world)
        space = ParamSpace(model)
        record = {"rank": rank, "loading": how, "local_numel": space.local_numel, "numel": space.numel,
                  **memory.as_dict()}
        with open(os.path.join(out, f"{loading}-rank{rank}.json"), "w") as f:
            json.dump(record, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    from actors.worker import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=11)
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--shard-size", default="100MB")
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    folder = os.path.join(args.out_dir, "model")
    numel = build_and_save(folder, hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                           shard_size=args.shard_size)
    files = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    model_mib = numel * 4 / 2**20
    rows = []
    for loading in ("full", "sharded"):
        mp.spawn(rank_main, args=(args.ranks, free_port(), folder, loading, args.out_dir), nprocs=args.ranks,
                 join=True)
        for rank in range(args.ranks):
            with open(os.path.join(args.out_dir, f"{loading}-rank{rank}.json")) as f:
                r = json.load(f)
            r["growth_over_model"] = r["peak_growth_mib"] / model_mib
            r["after_over_model"] = (r["rss_after_mib"] - r["rss_before_mib"]) / model_mib
            rows.append(r)
    result = {"numel": numel, "float32_mib": model_mib, "files": len(files), "ranks": args.ranks, "rows": rows,
              "torch": torch.__version__, "transformers": __import__("transformers").__version__}
    with open(os.path.join(args.out_dir, "load_memory.json"), "w") as f:
        json.dump(result, f, indent=2)
    print(f"{numel / 1e6:.1f}M parameters, float32 {model_mib:.0f} MiB in {len(files)} files, {args.ranks} ranks")
    print("| path | rank | peak RSS growth MiB | x float32 model | RSS kept after MiB | x model | method |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['loading']} | {r['rank']} | {r['peak_growth_mib']:.0f} | {r['growth_over_model']:.2f} | "
              f"{r['rss_after_mib'] - r['rss_before_mib']:.0f} | {r['after_over_model']:.2f} | {r['method']} |")


if __name__ == "__main__":
    main()
